-- Baseline 1 with the expected version, read in the same statement.
\set k random(1, :accounts)
\set amt random(1, 100)
SELECT bl.append('acct-' || :k::int, 'Noted', jsonb_build_object('account', :k::int, 'amount', :amt::int), NULL,
                 (SELECT COALESCE(max(s.version), 0) FROM bl.streams s WHERE s.stream_id = 'acct-' || :k::int));
