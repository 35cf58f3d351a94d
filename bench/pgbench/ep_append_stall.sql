-- ep_append of a type ('Moved') subscribed by the inline projection 'stall', which is rebuilt
-- in place while this runs (the stall figure).
\set k random(1, :accounts)
\set amt random(1, 100)
SELECT ep_append('acct-' || :k::int, 'Moved', jsonb_build_object('account', :k::int, 'amount', :amt::int));
