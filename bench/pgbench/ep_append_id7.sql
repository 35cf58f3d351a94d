-- ep_append with the caller's event id, time-ordered as a UUID v7 would be (millisecond time
-- first; PostgreSQL 15 has no uuidv7(), so the client builds it here).
\set k random(1, :accounts)
\set amt random(1, 100)
SELECT ep_append('acct-' || :k::int, 'Noted', jsonb_build_object('account', :k::int, 'amount', :amt::int), NULL, NULL,
                 (lpad(to_hex((extract(epoch FROM clock_timestamp()) * 1000)::bigint), 12, '0') || '7' || substr(md5(random()::text), 1, 19))::uuid);
