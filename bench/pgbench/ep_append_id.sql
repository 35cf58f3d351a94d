-- ep_append with the caller's event id (a random UUID v4, as most clients generate them).
\set k random(1, :accounts)
\set amt random(1, 100)
SELECT ep_append('acct-' || :k::int, 'Noted', jsonb_build_object('account', :k::int, 'amount', :amt::int), NULL, NULL, gen_random_uuid());
