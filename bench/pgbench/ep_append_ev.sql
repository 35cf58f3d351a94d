-- ep_append with the expected version, read in the same statement (optimistic concurrency as an
-- application does it). A lost race is SQLSTATE 40001, which pgbench --max-tries retries.
\set k random(1, :accounts)
\set amt random(1, 100)
SELECT ep_append('acct-' || :k::int, 'Noted', jsonb_build_object('account', :k::int, 'amount', :amt::int), NULL,
                 (SELECT COALESCE(max(s.version), 0) FROM ep.streams s WHERE s.stream_id = 'acct-' || :k::int));
