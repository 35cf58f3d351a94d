-- ep_append with metadata carrying a correlation and a causation id (the partial index
-- events_correlation_idx gets an entry).
\set k random(1, :accounts)
\set amt random(1, 100)
SELECT ep_append('acct-' || :k::int, 'Noted', jsonb_build_object('account', :k::int, 'amount', :amt::int),
                 jsonb_build_object('correlation_id', 'order-' || :k::int, 'causation_id', 'cmd-' || :amt::int));
