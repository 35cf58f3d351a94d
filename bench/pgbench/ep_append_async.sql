-- ep_append of a type ('Paid') subscribed by the async projection 'lag'.
\set k random(1, :accounts)
\set amt random(1, 100)
SELECT ep_append('acct-' || :k::int, 'Paid', jsonb_build_object('account', :k::int, 'amount', :amt::int));
