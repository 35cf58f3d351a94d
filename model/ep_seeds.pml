/*
 * ep_seeds.pml -- the protocol the seed documents published, in the same model as ep.pml:
 *  - an append takes the projection lock with a FAIL-FAST try (pg_try_advisory_xact_lock_shared)
 *    and skips the projection if it cannot get it, or if the status it reads is 'rebuilding';
 *    there is no registry lock and no REPEATABLE READ check;
 *  - the rebuild takes the exclusive lock, sets 'rebuilding', truncates, replays what it can see
 *    (checkpoint = last position applied), "looks for new events" one last time, flips to
 *    'active' and releases the lock. The skipped append holds no lock, so nothing makes that last
 *    look wait for it.
 * SPIN finds the blind spot: an event committed into the log and never applied
 * (model/seeds-counterexample.txt). By default one appender, so that the shortest trail is
 * exactly the seeds' scenario; check.sh also runs it with three (-DNAPP=3).
 */
#define SEEDS 1
#define SCEN_INPLACE 1
#ifndef NAPP
#define NAPP 1
#endif
#include "ep.pml"
