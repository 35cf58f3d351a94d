-- Baseline 2: the hand-written append with the seeds' gated inline projection (bench/baselines.sql).
\set k random(1, :accounts)
\set amt random(1, 100)
SELECT bl.append_projected('acct-' || :k::int, 'Credited', jsonb_build_object('account', :k::int, 'amount', :amt::int));
