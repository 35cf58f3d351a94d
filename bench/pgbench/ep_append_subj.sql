-- ep_append with a subject (0.5.0): the data sealed under the account's key (one key per account,
-- created by its first append), as an application keeping personal data erasable would append.
\set k random(1, :accounts)
\set amt random(1, 100)
SELECT ep_append('acct-' || :k::int, 'Noted', jsonb_build_object('account', :k::int, 'amount', :amt::int), NULL, NULL, NULL, 'customer-' || :k::int);
