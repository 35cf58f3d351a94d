-- Baseline 1: the hand-written append (bench/baselines.sql).
\set k random(1, :accounts)
\set amt random(1, 100)
SELECT bl.append('acct-' || :k::int, 'Noted', jsonb_build_object('account', :k::int, 'amount', :amt::int));
