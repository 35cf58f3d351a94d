-- ep_append with one inline projection ('live', per-event balance handler) subscribed to the type.
\set k random(1, :accounts)
\set amt random(1, 100)
SELECT ep_append('acct-' || :k::int, 'Credited', jsonb_build_object('account', :k::int, 'amount', :amt::int));
