/*
 * ep.pml -- the event_projections hand-off protocol (DESIGN.md) as a Promela model.
 * model/README.md states the bounds, the properties, the results and the step-to-code table.
 *
 * Scenarios (pick one with -D; default SCEN_INPLACE):
 *   SCEN_INPLACE  appenders + an in-place rebuild (R0, R1..Rk with H1..H4, Rf) + worker crashes
 *   SCEN_BG       appenders + a blue-green rebuild (B0, B1..Bk with H1..H4, Bf) + worker crashes
 *   SCEN_REG      appenders + a registration (G1 insert, G2 lock-free replay up to the high-water
 *                 mark with H1..H4, G3 catch-up under the registry lock) that may abort at any
 *                 point and be retried once, or given up
 *   SCEN_REGREB   SCEN_REG, then an in-place rebuild of the registered projection
 *   SCEN_ASYNC    appenders + async delivery (D1, D2 with H1..H4) + an async in-place rebuild
 *                 (truncate, position := 0) + worker crashes
 *   SCEN_VIEW     the per-backend view of the registry and the registry epoch (DESIGN.md 2, "The
 *                 view of the registry"): one session changes the registry (unregisters P, or with
 *                 VIEW_REG registers it), appends in the same transaction, commits or rolls back
 *                 (with VIEW_SAVEPOINT: the change and the append in a savepoint, ROLLBACK TO
 *                 SAVEPOINT, another append, then commit or roll back), then appends VAFTER times
 *                 (default 2) in transactions of their own; VNOTHER other backends (default 1)
 *                 append VOTX times each (default 2), each backend with its own kept view
 * Bounds: NAPP appenders (default 3), CFGk = "stream,events,subscribed,isolation" per appender,
 *   MAXCRASH worker crashes (default 1), BATCH events per replay transaction (default 2),
 *   REBUILDS rebuilds in a row (default 1).
 * Readers (invariant 4): READER adds a REPEATABLE READ reader; READER_GUARD gives it the A6-style
 *   check; R0_DELETE empties the in-place model with DELETE instead of TRUNCATE.
 * Variants:
 *   SEEDS                    the seeds' published protocol (fail-fast try-lock, skip on failure or
 *                            'rebuilding', no hand-off under the exclusive lock); see ep_seeds.pml
 *   BUG_NO_HW                replays/delivery use hw := L (last value), ignoring in-flight slots
 *   BUG_NO_PENDING           A8 publishes the slot only after nextval (no PENDING announce)
 *   BUG_CLEAR_BEFORE_COMMIT  A11 clears the slot before the commit is visible
 *   BUG_NO_RR_CHECK          A6 omitted
 *   BUG_STATUS_BEFORE_LOCK   A5 omitted: the decision uses the status read in A3, before A4
 *   BUG_LIST_BEFORE_REGLOCK  A3 (projection list) read before A2 (registry lock)
 *   BUG_RF_OLD_SNAPSHOT      Rf/Bf/G3 read the log with a snapshot taken before their lock was granted
 *   BUG_G2_NO_HW             the registration's G2 replays up to L (last value), ignoring in-flight slots
 *   REPLAY                   the projection has a replay handler: every replay (G2, R/B batches,
 *                            async catch-up) applies its whole range [checkpoint, hw] in one call
 *                            (replay.rs apply_range), reading the log with a snapshot taken when
 *                            it runs (READ COMMITTED, VOLATILE)
 *   BUG_REPLAY_TXN_SNAPSHOT  (with REPLAY, SCEN_REG) the registration's replay handler reads with
 *                            the transaction's snapshot from G1, as it would under REPEATABLE READ
 *                            (the code replays event by event there instead)
 *   BUG_LOCK_AFTER_INSERT    A7..A9 (stream lock, positions, insert) before A2..A6 (not a bug: passes)
 *   NO_LOCK_TIMEOUT          hand-offs wait for their exclusive lock without lock_timeout
 *   MIXED_LOCK_ORDER         appender 0 takes its stream lock before P SHARED, as a transaction
 *                            does whose earlier ep_append (of an unsubscribed type) locked a
 *                            stream and whose later ep_append needs P SHARED
 *   BUG_VIEW_SURVIVES_ROLLBACK  (SCEN_VIEW) the code before issue 11: a transaction that changed
 *                            the registry keeps the view its appends read (its own uncommitted
 *                            change) with the unchanged epoch; a rollback leaves it in place
 *   BUG_VIEW_NO_EPOCH_BUMP   (SCEN_VIEW) a committed registry change does not bump the epoch
 *   VIEW_NO_FORGET           (SCEN_VIEW) the change does not drop the backend's kept view (the fix
 *                            does not need the drop: passes)
 *
 * Every label names the DESIGN.md step it models.
 *
 * Abstractions (README.md argues each):
 *  - one projection P (inline, or async in SCEN_ASYNC), one worker process running its rebuild or
 *    delivery (the ownership lock makes it the only one);
 *  - an append's effects (events, handler writes, stream version) become visible in one atomic
 *    commit step; before that they are private to the appender (its inserted rows are invisible);
 *  - "abort" of an appender (handler error, client rollback, crash, server crash) is modelled
 *    once, just before commit; 40001 aborts at A6/A7 where they happen. An earlier abort only
 *    releases locks earlier: the same as the later abort with the appender's private steps first;
 *  - a worker crash may happen before any commit of the worker, and while it waits for a lock;
 *    it restarts from the committed phase/checkpoint (MAXCRASH bound);
 *  - a snapshot is modelled by reading the global "committed" state at the instant it is taken;
 *    a REPEATABLE READ transaction keeps copies of the few values its snapshot determines.
 */

/* ------------------------------------------------------------------ scenario */
#if !defined(SCEN_INPLACE) && !defined(SCEN_BG) && !defined(SCEN_REG) && !defined(SCEN_REGREB) && !defined(SCEN_ASYNC) && !defined(SCEN_VIEW)
#define SCEN_INPLACE 1
#endif
#if defined(SCEN_REG) || defined(SCEN_REGREB)
#define HAS_REG 1
#endif
#if defined(SCEN_INPLACE) || defined(SCEN_REGREB)
#define HAS_INPLACE 1
#endif
#if defined(SCEN_REGREB)
#define NWORK 2       /* registrar, then the rebuild worker */
#elif defined(SCEN_VIEW)
#define NWORK 0       /* no worker: the session and the other backends */
#else
#define NWORK 1
#endif

/* Appender configuration "stream,events,subscribed,isolation": stream 0 or 1; 1 or 2 events (one
 * ep_append_events call); all its events of a type P subscribes to (1) or not (0); isolation
 * 0 = READ COMMITTED, 1 = REPEATABLE READ, 2 = either (chosen nondeterministically). */
#if defined(SCEN_ASYNC)
#define DEF_CFG0 0,1,1,0
#define DEF_CFG1 1,1,0,0
#define DEF_CFG2 0,2,1,0
#elif defined(SCEN_VIEW)
/* backend 0 is the session, 1.. the other backends; one event per append, READ COMMITTED (the
 * `events` and `isolation` fields are not used in SCEN_VIEW) */
#define DEF_CFG0 0,1,1,0
#define DEF_CFG1 1,1,1,0
#define DEF_CFG2 0,1,1,0
#else
#define DEF_CFG0 0,1,1,0
#define DEF_CFG1 0,1,1,1
#define DEF_CFG2 1,2,1,0
#endif
#ifndef CFG0
#define CFG0 DEF_CFG0
#endif
#ifndef CFG1
#define CFG1 DEF_CFG1
#endif
#ifndef CFG2
#define CFG2 DEF_CFG2
#endif

#if defined(SCEN_VIEW)
#ifndef VNOTHER
#define VNOTHER 1     /* other backends appending concurrently (0..2) */
#endif
#ifndef VOTX
#define VOTX 2        /* transactions of each other backend (one append each) */
#endif
#ifndef VAFTER
#define VAFTER 2      /* the session's appends after the registry-changing transaction */
#endif
#if VNOTHER == 0
#define NAPP 1
#elif VNOTHER == 1
#define NAPP 2
#else
#define NAPP 3
#endif
#endif
#ifndef NAPP
#define NAPP 3
#endif
#ifndef MAXCRASH
#define MAXCRASH 1
#endif
#ifndef BATCH
#define BATCH 2       /* events per replay / delivery transaction */
#endif
#ifdef BUG_REPLAY_TXN_SNAPSHOT
#define G2SNAP txsnap
#define G3SNAP txsnap
#else
#define G2SNAP 0
#define G3SNAP snap
#endif
#ifdef REPLAY
#define RBATCH MAXPOS /* a replay handler applies its whole range at once */
#else
#define RBATCH BATCH
#endif
#ifndef REBUILDS
#define REBUILDS 1    /* rebuilds run one after the other by the worker */
#endif

#define NSTREAM 2
#define MAXPOS  6     /* >= total number of events of all appenders */
#if defined(SCEN_VIEW)
#ifdef VIEW_SAVEPOINT
#define VSP 1
#else
#define VSP 0
#endif
#if 1 + VSP + VAFTER + VNOTHER * VOTX > MAXPOS
#error "SCEN_VIEW: more events than positions (MAXPOS)"
#endif
#endif
#if defined(SCEN_ASYNC)
#define P_INLINE 0    /* subscribed_inline() never lists an async projection */
#else
#define P_INLINE 1
#endif
#if defined(SCEN_BG)
#define NCOPY 2
#else
#define NCOPY 1
#endif

/* Configuration accessors; CFGk expands to "stream,n,sub,rr". */
#define PICK_S(s,n,b,r) s
#define PICK_N(s,n,b,r) n
#define PICK_B(s,n,b,r) b
#define PICK_R(s,n,b,r) r
#define X_S(c) PICK_S(c)
#define X_N(c) PICK_N(c)
#define X_B(c) PICK_B(c)
#define X_R(c) PICK_R(c)
#define S_OF(i)   ((i)==0 -> X_S(CFG0) : ((i)==1 -> X_S(CFG1) : X_S(CFG2)))
#define N_OF(i)   ((i)==0 -> X_N(CFG0) : ((i)==1 -> X_N(CFG1) : X_N(CFG2)))
#define SUB_OF(i) ((i)==0 -> X_B(CFG0) : ((i)==1 -> X_B(CFG1) : X_B(CFG2)))
#define RR_OF(i)  ((i)==0 -> X_R(CFG0) : ((i)==1 -> X_R(CFG1) : X_R(CFG2)))

/* ------------------------------------------------------------------ state */
#define PENDING 255
#define INF     255

#define EV_NONE      0
#define EV_INFLIGHT  1   /* inserted by an open transaction: invisible to everyone else */
#define EV_COMMITTED 2
#define EV_ABORTED   3   /* a gap */

#define ST_NONE       0  /* not registered */
#define ST_ACTIVE     1
#define ST_REBUILDING 2

/* the log: ep.events + ep.global_position_seq */
byte seq;                       /* last value handed out by the sequence (H1 reads it) */
byte evst[MAXPOS+1];            /* per global position */
byte evown[MAXPOS+1];           /* appender that took the position */
byte evspos[MAXPOS+1];          /* stream position */
byte evprev[MAXPOS+1];          /* stream position of the previous subscribed event of its stream */

/* ep.streams (committed) */
byte stream_ver[NSTREAM];       /* stream version = last committed stream position */
byte sublast[NSTREAM];          /* stream position of the last committed subscribed event */

/* read models (committed): per copy, per event, how many times applied; last stream position
 * applied per stream (what a handler "sees" of its stream) */
byte cnt[NCOPY*(MAXPOS+1)];
byte lastp[NCOPY*NSTREAM];
#define CNT(c,p)  cnt[(c)*(MAXPOS+1)+(p)]
#ifdef READER
/* relfilenode generation of each copy's tables: TRUNCATE (R0) and CREATE (B0) give the tables new
 * storage; a snapshot taken before that sees none of the new storage's rows (not MVCC-safe) */
byte epoch[NCOPY];
#define NEW_STORAGE(c) epoch[c] = epoch[c] + 1
#else
#define NEW_STORAGE(c) skip
#endif
#define LAST(c,s) lastp[(c)*NSTREAM+(s)]

/* ep.projections row of P (committed) */
byte status;                    /* ST_* */
byte status_ver;                /* bumped by every hand-off commit: the row version (xmin) */
byte live;                      /* which copy is the live schema (blue-green) */
byte apos;                      /* async checkpoint `position` */
/* ep.rebuilds row (committed) */
byte rb_phase;                  /* 0 queued, 1 started (R0/B0 committed), 2 done */
byte rb_round;                  /* how many rebuilds are done */
byte checkpoint;

/* advisory locks (transaction level): registry (EP,0) and projection (EP,P) */
byte reg_s; bool reg_x; bool reg_xq;   /* shared holders, exclusive holder, exclusive waiter */
byte p_s;   bool p_x;   bool p_xq;
/* stream row locks: 0 free, else holder pid */
byte st_lock[NSTREAM];

/* in-flight slots (shared memory), one per appender backend */
byte slot[NAPP];

byte ndone;                     /* appenders finished (committed or aborted) */
byte wdone;                     /* workers (rebuild, delivery, registrar) finished */
bool regdone;                   /* the registrar finished (committed or gave up) */
bool rdone;                     /* the reader finished */
byte crashes;

/* temporaries of d_steps: not part of the state */
hidden byte h_p, h_s, h_v, h_k, h_last;
hidden byte h_view[NSTREAM];

/* which appenders insert (A7..A9) before taking the registry and projection locks */
#if defined(BUG_LOCK_AFTER_INSERT) || defined(SEEDS)
#define INSERT_FIRST(me) 1
#elif defined(MIXED_LOCK_ORDER)
#define INSERT_FIRST(me) ((me) == 0)
#endif

#define STREAM(p) S_OF(evown[p])
#define SUBD(p)   SUB_OF(evown[p])

/* ------------------------------------------------------------------ handler application
 * apply_range(copy, lo, hi, lim, snapmask, pend, newcp): the replay of a batch (replay.rs apply):
 * the subscribed events with lo < position <= hi visible to the snapshot, in position order, at
 * most lim of them, through the handler, into the transaction's pending writes `pend` (bitmask of
 * positions). The handler's view of a stream is the committed read model plus the transaction's
 * own writes; (b) is checked on every application: the handler sees exactly the stream's
 * subscribed prefix before the event. newcp := last applied if the batch was full, else hi.
 */
#define VISIBLE(p, snapmask) ((snapmask) == 0 -> evst[p] == EV_COMMITTED : (((snapmask) >> (p)) & 1))

inline apply_range(copy, lo, hi, lim, snapmask, pend, newcp)
{
  h_s = 0;
  do
  :: h_s < NSTREAM -> h_view[h_s] = LAST(copy, h_s); h_s++
  :: else -> break
  od;
#ifdef HAS_REG
  /* ... plus the transaction's own earlier writes: a registration replays in several steps of one
   * transaction (G2 batches, G3). Every other caller starts with pend = 0; compiled only where a
   * registrar runs, so that the other scenarios (and the kept trails) stay as they were. */
  h_p = 1;
  do
  :: h_p <= MAXPOS -> if :: (pend >> h_p) & 1 -> h_view[STREAM(h_p)] = evspos[h_p] :: else -> skip fi; h_p++
  :: else -> break
  od;
#endif
  h_k = 0; h_p = lo + 1; newcp = hi;
  do
  :: h_p <= hi && h_p <= MAXPOS && h_k < lim ->
     if
     :: VISIBLE(h_p, snapmask) && evst[h_p] == EV_COMMITTED && SUBD(h_p) ->
        assert(h_view[STREAM(h_p)] == evprev[h_p]);     /* (b) per-stream order, no gap */
        h_view[STREAM(h_p)] = evspos[h_p];
        pend = pend | (1 << h_p);
        h_k++;
        if
        :: h_k == lim -> newcp = h_p
        :: else -> skip
        fi
     :: else -> skip
     fi;
     h_p++
  :: else -> break
  od;
  h_p = 0; h_k = 0; h_s = 0
}

/* checkpoint := the last position applied (the seeds' checkpoint), unchanged if none */
inline last_applied(pend, cp)
{
  h_p = 1;
  do
  :: h_p <= MAXPOS -> if :: (pend >> h_p) & 1 -> cp = h_p :: else -> skip fi; h_p++
  :: else -> break
  od;
  h_p = 0
}

/* merge a transaction's pending handler writes into a copy at its commit */
inline merge(copy, pend)
{
  h_p = 1;
  do
  :: h_p <= MAXPOS ->
     if
     :: (pend >> h_p) & 1 ->
        CNT(copy, h_p) = CNT(copy, h_p) + 1;
        assert(CNT(copy, h_p) <= 1);                     /* (a) never applied twice */
        LAST(copy, STREAM(h_p)) = evspos[h_p]
     :: else -> skip
     fi;
     h_p++
  :: else -> break
  od;
  h_p = 0;
  pend = 0
}

inline truncate(copy)
{
  h_p = 0;
  do
  :: h_p <= MAXPOS -> CNT(copy, h_p) = 0; h_p++
  :: else -> break
  od;
  h_p = 0;
  do
  :: h_p < NSTREAM -> LAST(copy, h_p) = 0; h_p++
  :: else -> break
  od;
  h_p = 0
}

/* the committed set as a bitmask (bit 0 always set so that 0 means "read the current state") */
inline snapshot_mask(m)
{
  m = 1; h_p = 1;
  do
  :: h_p <= MAXPOS -> if :: evst[h_p] == EV_COMMITTED -> m = m | (1 << h_p) :: else -> skip fi; h_p++
  :: else -> break
  od;
  h_p = 0
}

/* a copy holds exactly the committed subscribed events, each once, in stream order */
inline check_copy(copy)
{
  h_p = 1;
  do
  :: h_p <= MAXPOS ->
     if
     :: evst[h_p] == EV_COMMITTED && SUBD(h_p) -> assert(CNT(copy, h_p) == 1)
     :: else -> assert(CNT(copy, h_p) == 0)
     fi;
     h_p++
  :: else -> break
  od;
  h_p = 0;
  do
  :: h_p < NSTREAM -> assert(LAST(copy, h_p) == sublast[h_p]); h_p++
  :: else -> break
  od;
  h_p = 0
}

inline check_empty(copy)
{
  h_p = 0;
  do
  :: h_p <= MAXPOS -> assert(CNT(copy, h_p) == 0); h_p++
  :: else -> break
  od;
  h_p = 0
}

/* ------------------------------------------------------------------ high-water mark H1..H3
 * inflight.rs horizon + highwater.rs compute: L := last_value; scan the slots one by one
 * (each read is its own step: the scan is not atomic); a PENDING slot restarts; hw = min(L, m-1).
 */
inline highwater(hw, L, i, m)
{
  do
  :: true ->
H1_last_value:
     L = seq;
#ifdef BUG_NO_HW
     break
#else
     i = 0; m = INF;
H2_scan_slots:
     /* each slot is loaded once (inflight.rs horizon: one atomic load of min_position) */
     do
     :: i < NAPP ->
        d_step {
          if
          :: slot[i] == PENDING -> i = INF                     /* unsettled: retry from H1 */
          :: slot[i] != PENDING && slot[i] != 0 && slot[i] < m -> m = slot[i]; i++
          :: else -> i++
          fi
        }
     :: i == NAPP || i == INF -> break
     od;
     if
     :: i == INF -> skip
     :: else -> break
     fi
#endif
  od;
H3_hw:
  if
  :: m != 0 && m != INF && m - 1 < L -> hw = m - 1
  :: else -> hw = L
  fi;
  i = 0; m = 0; L = 0
}

/* exclusive lock on P for a hand-off, with lock_timeout: while the lock is not grantable the
 * waiter may give up (then `gaveup` is set); while it waits it blocks new SHARED requests (the
 * PostgreSQL lock queue). */
inline lock_p_exclusive(gaveup)
{
  gaveup = 0;
  p_xq = 1;
  if
  :: atomic { p_s == 0 && !p_x -> p_x = 1; p_xq = 0 }
#ifndef NO_LOCK_TIMEOUT
  :: atomic { !(p_s == 0 && !p_x) -> p_xq = 0; gaveup = 1 }      /* lock_timeout: back off */
  :: atomic { !(p_s == 0 && !p_x) && crashes < MAXCRASH -> p_xq = 0; crashes++; gaveup = 2 }
#endif
  fi
}

/* ------------------------------------------------------------------ appender (log.rs append) */
proctype appender(byte me)
{
  bool rr;                     /* REPEATABLE READ (or SERIALIZABLE) transaction */
  bool hreg, hp, hst;          /* locks held: registry SHARED, P SHARED, stream row */
  bool inlist;                 /* A3: P is in the subscribed inline list */
  bool apply;                  /* A5: P active -> apply */
  byte copy;                   /* A5: which copy is the live read model */
  byte snapver, snapsv;        /* REPEATABLE READ snapshot: P's row version, my stream's version */
  byte snapl[NCOPY];           /* ... and what it shows of my stream in each read-model copy */
  byte k;

A1_validate:
  /* a REPEATABLE READ transaction's snapshot is taken at its first statement, before A2 */
  if
  :: RR_OF(me) != 0 -> rr = 1
  :: RR_OF(me) != 1 -> rr = 0
  fi;
  if
  :: rr -> d_step { snapver = status_ver; snapsv = stream_ver[S_OF(me)];
                           k = 0; do :: k < NCOPY -> snapl[k] = LAST(k, S_OF(me)); k++ :: else -> break od; k = 0 }
  :: else -> skip
  fi;

#ifdef INSERT_FIRST
  /* insert first (the seeds: "an append inserts event 1000, sees the projection rebuilding (or
   * fails to get the lock) and skips the projection") */
  if
  :: INSERT_FIRST(me) -> goto A7_stream_lock
  :: else -> skip
  fi;
after_insert:
#endif

#ifdef BUG_LIST_BEFORE_REGLOCK
  inlist = (status != ST_NONE) && SUB_OF(me) && P_INLINE;
#endif
A2_registry_shared:
#ifndef SEEDS
  atomic { !reg_x && !reg_xq -> reg_s++; hreg = 1 }
#else
  skip;        /* the seeds have no registry lock */
#endif
#ifndef BUG_LIST_BEFORE_REGLOCK
A3_read_list:
  inlist = (status != ST_NONE) && SUB_OF(me) && P_INLINE;       /* GetLatestSnapshot after A2 */
#endif
#ifdef BUG_STATUS_BEFORE_LOCK
  d_step { apply = inlist && status == ST_ACTIVE; copy = live }
#endif
A4_projection_shared:
  if
  :: inlist ->
#ifdef SEEDS
     /* seeds: pg_try_advisory_xact_lock_shared; on failure skip the projection */
     if
     :: atomic { !p_x && !p_xq -> p_s++; hp = 1 }
     :: atomic { p_x || p_xq -> inlist = 0 }
     fi
#else
     atomic { !p_x && !p_xq -> p_s++; hp = 1 }
#endif
  :: else -> skip
  fi;
A5_status_fresh:
  /* A5 (status re-read with a snapshot taken now) and A6 (the REPEATABLE READ check) are
   * consecutive private steps of the appender: one atomic step */
  atomic {
#ifndef BUG_STATUS_BEFORE_LOCK
    apply = inlist && status == ST_ACTIVE; copy = live;
#else
    apply = apply && inlist;
#endif
A6_rr_check:
    if
#if !defined(BUG_NO_RR_CHECK) && !defined(SEEDS)
    :: rr && apply && status_ver != snapver -> goto abort            /* SQLSTATE 40001 */
#endif
    :: else -> skip
    fi
  }

#ifdef INSERT_FIRST
  if
  :: INSERT_FIRST(me) -> goto A10_handlers
  :: else -> skip
  fi;
#endif

A7_stream_lock:
  atomic { st_lock[S_OF(me)] == 0 -> st_lock[S_OF(me)] = _pid; hst = 1 }
  /* REPEATABLE READ: INSERT .. ON CONFLICT DO UPDATE on a row version the snapshot cannot see
   * raises 40001 (PostgreSQL, not the extension) */
  if
  :: rr && stream_ver[S_OF(me)] != snapsv -> goto abort
  :: else -> skip
  fi;

A8_slot_positions:
#ifndef BUG_NO_PENDING
  slot[me] = PENDING;
#endif
  k = 0;
  do
  :: k < N_OF(me) ->
     /* nextval (one step each: another appender can take a position in between), and the
      * event row (A9: inserted, invisible until commit) */
     d_step {
       seq++; evst[seq] = EV_INFLIGHT; evown[seq] = me;
       evspos[seq] = stream_ver[S_OF(me)] + k + 1;
       if
       :: k == 0 -> evprev[seq] = sublast[S_OF(me)]
       :: else -> evprev[seq] = evspos[seq] - 1      /* same type: previous is my own event */
       fi
     };
     k++
  :: else -> break
  od;
  k = 0;
A8_publish:
  d_step {
    h_p = 1;
    do
    :: h_p <= MAXPOS && !(evown[h_p] == me && evst[h_p] == EV_INFLIGHT) -> h_p++
    :: else -> break
    od;
    slot[me] = h_p; h_p = 0
  }
A9_insert:
#ifdef INSERT_FIRST
  if
  :: INSERT_FIRST(me) -> goto after_insert
  :: else -> skip
  fi;
#endif

A10_handlers:
  if
  :: apply ->
     d_step {
       h_v = (rr -> snapl[copy] : LAST(copy, S_OF(me)));
       h_p = 1;
       do
       :: h_p <= MAXPOS ->
          if
          :: evown[h_p] == me && evst[h_p] == EV_INFLIGHT ->
             assert(h_v == evprev[h_p]);                 /* (b) */
             h_v = evspos[h_p]
          :: else -> skip
          fi;
          h_p++
       :: else -> break
       od;
       h_p = 0; h_v = 0
     }
  :: else -> skip
  fi;

A11_commit:
  if
  :: true ->
#ifdef BUG_CLEAR_BEFORE_COMMIT
     slot[me] = 0;
#endif
     d_step {
       /* commit record visible: the events, the stream version, the handler's writes */
       h_p = 1;
       do
       :: h_p <= MAXPOS ->
          if
          :: evown[h_p] == me && evst[h_p] == EV_INFLIGHT ->
             evst[h_p] = EV_COMMITTED;
             stream_ver[S_OF(me)] = evspos[h_p];
             if
             :: SUB_OF(me) -> sublast[S_OF(me)] = evspos[h_p]
             :: else -> skip
             fi;
             if
             :: apply ->
                CNT(copy, h_p) = CNT(copy, h_p) + 1;
                assert(CNT(copy, h_p) <= 1);            /* (a) */
                LAST(copy, S_OF(me)) = evspos[h_p]
             :: else -> skip
             fi
          :: else -> skip
          fi;
          h_p++
       :: else -> break
       od;
       h_p = 0
     }
     goto release
  :: true -> goto abort      /* handler error, client ROLLBACK, crash */
  fi;

abort:
  atomic {
    h_p = 1;
    do
    :: h_p <= MAXPOS ->
       if
       :: evown[h_p] == me && evst[h_p] == EV_INFLIGHT -> evst[h_p] = EV_ABORTED
       :: else -> skip
       fi;
       h_p++
    :: else -> break
    od;
    h_p = 0
  }
release:
  /* A11 xact callback: slot := 0 after the commit/abort is visible; then the locks go */
  atomic {
    slot[me] = 0;
    if :: hst -> st_lock[S_OF(me)] = 0 :: else -> skip fi;
    if :: hp -> p_s-- :: else -> skip fi;
    if :: hreg -> reg_s-- :: else -> skip fi;
    hst = 0; hp = 0; hreg = 0; inlist = 0; apply = 0; copy = 0; rr = 0;
    snapver = 0; snapsv = 0; k = 0;
    do :: k < NCOPY -> snapl[k] = 0; k++ :: else -> break od; k = 0;
    ndone++
  }
}

/* ------------------------------------------------------------------ in-place rebuild (rebuild.rs) */
#if defined(HAS_INPLACE) && !defined(SEEDS)
proctype rebuild_inplace()
{
  byte hw, L, i, m, pend, newcp, snap;
  byte gaveup;

#ifdef HAS_REG
  /* a rebuild can be requested once the projection exists */
  (status == ST_ACTIVE || regdone);
  if
  :: status == ST_NONE -> goto finished
  :: else -> skip
  fi;
#endif
restart:
  if
  :: rb_phase == 0 -> goto R0_handoff
  :: rb_phase == 1 -> goto Rk_choose
  :: rb_phase == 2 -> goto finished
  fi;

R0_handoff:
  lock_p_exclusive(gaveup);
  if :: gaveup -> goto restart :: else -> skip fi;
  if
  :: crashes < MAXCRASH -> crashes++; p_x = 0; goto restart      /* crash before commit */
  :: true -> skip
  fi;
  d_step {
    status = ST_REBUILDING; status_ver++;
    truncate(0);
#ifndef R0_DELETE
    NEW_STORAGE(0);          /* TRUNCATE: new storage, not MVCC-safe */
#endif
    checkpoint = 0; rb_phase = 1;
    p_x = 0                                            /* commit, then the lock goes */
  }

Rk_choose:
  if
  :: goto R_batch
  :: goto Rf_handoff
  fi;

R_batch:
  highwater(hw, L, i, m);
H4_R_snapshot:
  d_step { apply_range(0, checkpoint, hw, RBATCH, 0, pend, newcp) }
  if
  :: crashes < MAXCRASH -> crashes++; pend = 0; newcp = 0; hw = 0; goto restart
  :: true -> skip
  fi;
R_commit:
  d_step { merge(0, pend); checkpoint = newcp; newcp = 0; hw = 0 }
  goto Rk_choose;

Rf_handoff:
#ifdef BUG_RF_OLD_SNAPSHOT
  atomic { snapshot_mask(snap) }
#endif
  lock_p_exclusive(gaveup);
  if :: gaveup -> snap = 0; goto restart :: else -> skip fi;
Rf_catchup:
  d_step { apply_range(0, checkpoint, MAXPOS, MAXPOS, snap, pend, newcp); newcp = 0; snap = 0 }
  if
  :: crashes < MAXCRASH -> crashes++; pend = 0; p_x = 0; goto restart
  :: true -> skip
  fi;
Rf_commit:
  d_step {
    merge(0, pend);
    status = ST_ACTIVE; status_ver++; rb_phase = 2;
    p_x = 0
  }
  if
  :: rb_round + 1 < REBUILDS -> d_step { rb_round++; rb_phase = 0 }; goto restart   /* the next rebuild */
  :: else -> skip
  fi;
finished:
  wdone++
}
#endif

/* ------------------------------------------------------------------ seeds' rebuild (SEEDS) */
#if defined(HAS_INPLACE) && defined(SEEDS)
proctype rebuild_seeds()
{
  byte pend, newcp;
  /* the exclusive lock for the whole rebuild (waits for the shared holders) */
S_lock:
  atomic { p_s == 0 && !p_x -> p_x = 1 }
S_start:
  d_step { status = ST_REBUILDING; status_ver++; truncate(0); checkpoint = 0 }
S_replay:
  /* "replay all events, then look for new ones": read what is visible, checkpoint by position */
  do
  :: atomic { apply_range(0, checkpoint, MAXPOS, MAXPOS, 0, pend, newcp);
              last_applied(pend, checkpoint); merge(0, pend); newcp = 0 }
  :: break
  od;
S_done:
  /* nothing new visible: declare done, flip to active, release the lock */
  atomic { apply_range(0, checkpoint, MAXPOS, MAXPOS, 0, pend, newcp);
           merge(0, pend); newcp = 0;
           status = ST_ACTIVE; status_ver++; p_x = 0 }
  wdone++
}
#endif

/* ------------------------------------------------------------------ blue-green rebuild */
#if defined(SCEN_BG)
proctype rebuild_bluegreen()
{
  byte hw, L, i, m, pend, newcp, snap;
  byte gaveup;

restart:
  if
  :: rb_phase == 0 -> goto B0_create
  :: rb_phase == 1 -> goto Bk_choose
  :: rb_phase == 2 -> goto finished
  fi;

B0_create:
  if
  :: crashes < MAXCRASH -> crashes++; goto restart
  :: true -> skip
  fi;
  d_step { truncate(1 - live); NEW_STORAGE(1 - live); checkpoint = 0; rb_phase = 1 }   /* build copy, empty */

Bk_choose:
  if
  :: goto B_batch
  :: goto Bf_handoff
  fi;

B_batch:
  highwater(hw, L, i, m);
H4_B_snapshot:
  d_step { apply_range(1 - live, checkpoint, hw, RBATCH, 0, pend, newcp) }
  if
  :: crashes < MAXCRASH -> crashes++; pend = 0; newcp = 0; hw = 0; goto restart
  :: true -> skip
  fi;
B_commit:
  d_step { merge(1 - live, pend); checkpoint = newcp; newcp = 0; hw = 0 }
  goto Bk_choose;

Bf_handoff:
#ifdef BUG_RF_OLD_SNAPSHOT
  atomic { snapshot_mask(snap) }
#endif
  lock_p_exclusive(gaveup);
  if :: gaveup -> snap = 0; goto restart :: else -> skip fi;
Bf_catchup:
  d_step { apply_range(1 - live, checkpoint, MAXPOS, MAXPOS, snap, pend, newcp); newcp = 0; snap = 0 }
Bf_table_locks:
  /* ACCESS EXCLUSIVE on both schemas' tables, same lock_timeout: a reader may hold one */
  if
  :: true -> skip
  :: true -> pend = 0; p_x = 0; goto restart          /* timeout: roll back, retry later */
  :: crashes < MAXCRASH -> crashes++; pend = 0; p_x = 0; goto restart
  fi;
Bf_switch:
  d_step {
    merge(1 - live, pend);
    /* (c): the copy about to go live is complete and equals the live one */
    check_copy(1 - live);
    check_copy(live);
    live = 1 - live; status_ver++; rb_phase = 2;
    p_x = 0
  }
  if
  :: rb_round + 1 < REBUILDS -> d_step { rb_round++; rb_phase = 0 }; goto restart   /* the next rebuild */
  :: else -> skip
  fi;
finished:
  wdone++
}
#endif

/* ------------------------------------------------------------------ registration (registry.rs) */
#if defined(HAS_REG)
/* One ep_register_projection call in its own transaction (registry.rs register,
 * build_for_registration). Everything it writes (the projection row, the handler's writes into the
 * read model: `pend`) is private until G_commit. It may abort at any point (handler error, client
 * rollback, crash): nothing of it stays; the user may retry once, or give up. */
proctype registrar()
{
  byte hw, L, i, m, pend, newcp, snap;
  byte after;                  /* G2's checkpoint: every subscribed event <= after is in pend */
  byte txsnap;                 /* BUG_REPLAY_TXN_SNAPSHOT: the snapshot of G1 */
  byte rounds;                 /* G2 rounds done */
  bool tried;

G1_insert:
  skip;      /* validate; INSERT the projection row, 'active', generation 1: invisible until commit */
#ifdef BUG_REPLAY_TXN_SNAPSHOT
  atomic { snapshot_mask(txsnap) }  /* the transaction's snapshot, which the replay handler would read with */
#endif

G2_round:
  /* build_for_registration, no lock: compute hw, replay up to it; again while the gap to the head
   * shrinks. Modelled: 0, 1 or 2 rounds, chosen nondeterministically (0 = the code's "gap too small"
   * break, and the path without the preload, where G2 is skipped) */
  if
  :: rounds < 2 -> rounds++
  :: goto G3_registry_exclusive
  :: goto abort                                  /* error/crash before the lock */
  fi;
#ifdef BUG_G2_NO_HW
H1_last_value:
  hw = seq;                                      /* BUG: hw := L, the in-flight slots ignored */
#else
  highwater(hw, L, i, m);                        /* H1..H3: highwater::compute */
#endif
G2_replay:
  /* replay::apply(.., after, hw, batch, Snap::Latest) until done; each call takes its snapshot
   * after hw was computed (H4) */
  do
  :: hw > after ->
H4_G2_snapshot:
     d_step { apply_range(0, after, hw, RBATCH, G2SNAP, pend, newcp); after = newcp; newcp = 0 }
  :: else -> break
  od;
  hw = 0;
  goto G2_round;

G3_registry_exclusive:
#ifdef BUG_RF_OLD_SNAPSHOT
  atomic { snapshot_mask(snap) }
#endif
  /* handoff::lock_patiently(REGISTRY, Exclusive): each attempt is a subtransaction with the
   * hand-off lock_timeout; a timed-out attempt rolls back only itself (G1/G2's work stays) and is
   * tried again. While queued it blocks new SHARED requests (the PostgreSQL lock queue). */
  reg_xq = 1;
  if
  :: atomic { reg_s == 0 && !reg_x -> reg_x = 1; reg_xq = 0 }
#ifndef NO_LOCK_TIMEOUT
  :: atomic { !(reg_s == 0 && !reg_x) -> reg_xq = 0; snap = 0 }; goto G3_registry_exclusive   /* lock_timeout */
#endif
  :: atomic { !(reg_s == 0 && !reg_x) -> reg_xq = 0 }; goto abort     /* cancelled/crash while waiting */
  fi;
G3_last_value:
  L = seq;                 /* highwater::last_value, read after the lock was granted */
G3_catchup:
  /* replay::apply(.., after, L, batch, Snap::Latest) until done: every visible subscribed event
   * with after < position <= L (under the lock nothing at or below L commits any more) */
  d_step { apply_range(0, after, L, MAXPOS, G3SNAP, pend, newcp); newcp = 0; snap = 0; L = 0 }
G_commit:
  if
  :: d_step { merge(0, pend); status = ST_ACTIVE; status_ver++; reg_x = 0; regdone = 1;
              after = 0; rounds = 0 }
     goto finished
  :: goto abort                                  /* error/crash with the lock held */
  fi;

abort:
  /* rollback: the row and the handler's writes vanish, the lock (held or requested) goes */
  atomic { pend = 0; after = 0; rounds = 0; hw = 0; snap = 0; txsnap = 0; reg_x = 0; reg_xq = 0 }
  if
  :: !tried -> tried = 1; goto G1_insert         /* the user retries */
  :: regdone = 1                                 /* gives up */
  fi;
finished:
  wdone++
}
#endif

/* ------------------------------------------------------------------ async delivery (delivery.rs) */
#if defined(SCEN_ASYNC)
proctype delivery()
{
  byte hw, L, i, m, pend, newcp;
  bool rebuilt, quiet;

D1_highwater:
  quiet = (ndone == NAPP);             /* for the model's end only: no append will come */
  highwater(hw, L, i, m);
  if
  :: hw <= apos && quiet -> goto caught_up
  :: hw <= apos && !quiet -> hw = 0; goto D1_highwater               /* sleep until woken */
  :: hw > apos -> skip
  fi;
D2_batch:
  d_step { apply_range(0, apos, hw, RBATCH, 0, pend, newcp) }
  if
  :: crashes < MAXCRASH -> crashes++; pend = 0; newcp = 0; hw = 0; goto D1_highwater
  :: true -> skip
  fi;
D2_commit:
  d_step { merge(0, pend); apos = newcp; newcp = 0; hw = 0 }
  if
  :: !rebuilt -> rebuilt = 1; d_step { truncate(0); apos = 0 }   /* async in-place rebuild */
  :: true -> skip
  fi;
  goto D1_highwater;

caught_up:
  hw = 0;
  wdone++
}
#endif

/* ------------------------------------------------------------------ a reader (invariant 4) */
#ifdef READER
/* A REPEATABLE READ reader: "SELECT status ...; SELECT * FROM <schema>.<table>" in one transaction.
 * Its snapshot is taken at its first statement; the second statement resolves the schema name with
 * the latest catalog (after a blue-green switch: the former build tables) and reads rows with the
 * transaction snapshot. Invariant 4: if the status it sees is 'active', the model it reads is the
 * complete model of the log as of its snapshot (else it can fail fast on 'rebuilding').
 * READER_GUARD: the reader first checks, as A6 does, that P's row version read now is visible to
 * its snapshot, and raises 40001 otherwise. */
proctype reader()
{
  byte s_status, s_ver, s_want, c, seen;
  byte s_mask[NCOPY], s_epoch[NCOPY];

Rd_snapshot:
  d_step {
    s_status = status; s_ver = status_ver; s_want = 0;
    h_p = 1;
    do
    :: h_p <= MAXPOS ->
       if :: evst[h_p] == EV_COMMITTED && SUBD(h_p) -> s_want = s_want | (1 << h_p) :: else -> skip fi;
       c = 0;
       do
       :: c < NCOPY -> if :: CNT(c, h_p) > 0 -> s_mask[c] = s_mask[c] | (1 << h_p) :: else -> skip fi; c++
       :: else -> break
       od;
       h_p++
    :: else -> break
    od;
    c = 0;
    do :: c < NCOPY -> s_epoch[c] = epoch[c]; c++ :: else -> break od;
    c = 0; h_p = 0
  }
Rd_read:
  d_step {
#ifdef READER_GUARD
    if
    :: status_ver != s_ver -> s_status = ST_NONE              /* 40001: fails fast */
    :: else -> skip
    fi;
#endif
    c = live;
    seen = (epoch[c] != s_epoch[c] -> 0 : s_mask[c]);
    if
    :: s_status == ST_ACTIVE -> assert(seen == s_want)         /* (4) complete, or fail fast */
    :: else -> skip
    fi;
    s_status = 0; s_ver = 0; s_want = 0; c = 0; seen = 0;
    do :: c < NCOPY -> s_mask[c] = 0; s_epoch[c] = 0; c++ :: else -> break od; c = 0
  }
  rdone = 1
}
#endif

/* ------------------------------------------------------------------ the view of the registry (SCEN_VIEW)
 * DESIGN.md 2, "The view of the registry"; src/registry.rs projections_for_appends, src/inflight.rs
 * bump_epoch_at_commit / registry_changed_here / on_xact_event.
 *
 * Each backend b keeps (kv_ok[b], kv_ep[b], kv_st[b]): a view of the registry (here: P's row, absent
 * or its status) and the registry epoch it was read under. `repoch` is the shared-memory epoch,
 * bumped by the xact callback of a transaction that changed the registry, after its commit is
 * visible and before its locks are released; never at an abort. A3 (after the registry lock) and
 * A5 (after P's lock) use the kept view if the epoch equals the kept one, else read the catalog
 * with a fresh snapshot (which also sees the reading transaction's own uncommitted change) and keep
 * the result with the epoch read *before* the catalog read.
 * The fix (issue 11): a transaction that has changed the registry (`chg`: set at the change, kept
 * by ROLLBACK TO SAVEPOINT, cleared at the top-level commit/abort) neither uses nor keeps a view:
 * every A3/A5 in it reads the catalog. BUG_VIEW_SURVIVES_ROLLBACK: the code before the fix, which
 * keeps that view (its own uncommitted change) under the unchanged epoch.
 * Abstractions: P is inline and never rebuilt here (no worker, no status flip without the registry
 * lock), so the in-flight slots and the high-water mark play no part and are left out; the
 * session's registration is G1 + G3 (0 G2 rounds, a path of the code; the registration checks
 * cover G2); the hand-off lock waits of unregister/register are plain waits (with one registry
 * changer and the lock order registry -> P there is no cycle to break); every append is one event,
 * READ COMMITTED (A6 does not apply); a plain append transaction commits (its abort touches no view).
 * Property (e), at every handler call: P exists for the calling transaction (committed and not
 * deleted by it, or inserted by it); (a) at the end, and at the commit of an unregistration (P's
 * model is then complete, and by (e) nothing is applied to it afterwards).
 */
#if defined(SCEN_VIEW)
#define TX_DEL 1      /* this transaction deleted P's row (ep_unregister_projection) */
#define TX_INS 2      /* this transaction inserted P's row (ep_register_projection, G1) */
/* P's status as a catalog read with a fresh snapshot sees it, in a transaction whose own change is `own` */
#define FRESH(own) ((own) == TX_DEL -> ST_NONE : ((own) == TX_INS -> ST_ACTIVE : status))

byte repoch;                    /* the registry epoch (shared memory) */
bool kv_ok[NAPP];               /* per backend: a kept view, */
byte kv_ep[NAPP];               /* the epoch it was read under, */
byte kv_st[NAPP];               /* and what it says of P (ST_NONE: not registered) */

#ifdef VIEW_NO_FORGET
#define FORGET_VIEW(b) skip
#else
#define FORGET_VIEW(b) kv_ok[b] = 0     /* forget_inline_view at the change */
#endif

/* projections_for_appends (A3 and A5): vst := P's status as this backend's view says. The epoch is
 * read in one step and the kept view compared / the catalog read in the next. */
inline view_get(b, own, chg, vst, e)
{
#ifndef BUG_VIEW_SURVIVES_ROLLBACK
  if
  :: chg -> vst = FRESH(own)               /* changed here: a fresh read, nothing kept */
  :: else ->
#endif
     e = repoch;                            /* the epoch, before the catalog */
     d_step {
       if
       :: kv_ok[b] && kv_ep[b] == e -> vst = kv_st[b]                      /* the kept view */
       :: else -> vst = FRESH(own); kv_ok[b] = 1; kv_ep[b] = e; kv_st[b] = vst   /* read, keep */
       fi;
       e = 0
     }
#ifndef BUG_VIEW_SURVIVES_ROLLBACK
  fi
#endif
}

/* A2..A10 of one ep_append (one event) by backend b in a transaction whose own registry change is
 * `own`, holding the registry / P EXCLUSIVE already if hregx / hpx (a backend's own locks do not
 * conflict with its requests). Handler writes go to the transaction's `pend`. */
inline v_append(b, own, chg, hregx, hpx, hreg, hp, hst, inlist, apply, vst, e, pend, pos)
{
  skip;
A2_registry_shared:
  atomic { hregx || hreg || (!reg_x && !reg_xq) -> if :: !hregx && !hreg -> reg_s++; hreg = 1 :: else -> skip fi }
A3_read_list:
  view_get(b, own, chg, vst, e);
  inlist = (vst != ST_NONE) && SUB_OF(b);
  vst = 0;
A4_projection_shared:
  if
  :: inlist -> atomic { hpx || hp || (!p_x && !p_xq) -> if :: !hpx && !hp -> p_s++; hp = 1 :: else -> skip fi }
  :: else -> skip
  fi;
A5_status_fresh:
  view_get(b, own, chg, vst, e);
  apply = inlist && vst == ST_ACTIVE;
  vst = 0;
A7_stream_lock:
  atomic { st_lock[S_OF(b)] == 0 -> st_lock[S_OF(b)] = _pid; hst = 1 }
A8_slot_positions:
  /* nextval and the insert (A9): invisible until the commit */
  d_step {
    seq++; pos = seq; evst[pos] = EV_INFLIGHT; evown[pos] = b;
    evspos[pos] = stream_ver[S_OF(b)] + 1; evprev[pos] = sublast[S_OF(b)]
  }
A10_handlers:
  if
  :: apply ->
     d_step {
       assert(FRESH(own) != ST_NONE);       /* (e) no handler for a projection that does not exist */
       /* the handler's view of the stream: the committed model plus the transaction's own writes */
       h_v = LAST(0, S_OF(b));
       h_p = 1;
       do
       :: h_p <= MAXPOS ->
          if :: ((pend >> h_p) & 1) && STREAM(h_p) == S_OF(b) -> h_v = evspos[h_p] :: else -> skip fi;
          h_p++
       :: else -> break
       od;
       assert(h_v == evprev[pos]);          /* (b) */
       pend = pend | (1 << pos);
       h_p = 0; h_v = 0
     }
  :: else -> skip
  fi;
  inlist = 0; apply = 0; pos = 0
}

/* the commit record of backend b's transaction: its events, stream version, handler writes */
inline v_commit(b, pend)
{
  h_p = 1;
  do
  :: h_p <= MAXPOS ->
     if
     :: evown[h_p] == b && evst[h_p] == EV_INFLIGHT ->
        evst[h_p] = EV_COMMITTED;
        stream_ver[S_OF(b)] = evspos[h_p];
        if :: SUB_OF(b) -> sublast[S_OF(b)] = evspos[h_p] :: else -> skip fi
     :: else -> skip
     fi;
     h_p++
  :: else -> break
  od;
  h_p = 0;
  merge(0, pend)
}

/* backend b's uncommitted events become gaps (abort, or ROLLBACK TO a savepoint taken before them) */
inline v_abort(b)
{
  h_p = 1;
  do
  :: h_p <= MAXPOS ->
     if :: evown[h_p] == b && evst[h_p] == EV_INFLIGHT -> evst[h_p] = EV_ABORTED :: else -> skip fi;
     h_p++
  :: else -> break
  od;
  h_p = 0
}

/* the locks of an append go (commit, abort, or the rollback of the savepoint they were taken in) */
inline v_unlock(b, hreg, hp, hst)
{
  if :: hst -> st_lock[S_OF(b)] = 0 :: else -> skip fi;
  if :: hp -> p_s-- :: else -> skip fi;
  if :: hreg -> reg_s-- :: else -> skip fi;
  hst = 0; hp = 0; hreg = 0
}

/* The session (backend 0): issue 11's script.
 *   BEGIN; [SAVEPOINT s;] ep_unregister_projection('P') | ep_register_projection('P', ..);
 *   ep_append(..);
 *   [ROLLBACK TO SAVEPOINT s; ep_append(..);]  COMMIT | ROLLBACK;
 *   then VAFTER times: ep_append(..) (a transaction of its own, committed) */
proctype session()
{
  bool chg;                    /* changed_here (inflight.rs registry_changed_here, BUMP_AT_COMMIT) */
  byte txp;                    /* this transaction's own uncommitted change of P's row: TX_DEL, TX_INS */
  bool hregx, hpx;             /* registry / P EXCLUSIVE held (unregister, registration) */
  bool hreg, hp, hst, inlist, apply;
  byte vst, e, pend, pos, newcp, L;
  byte ph;                     /* the statement of the script: 1 the append after the change, 2 the
                                * append after ROLLBACK TO SAVEPOINT, 3.. the later transactions */

T_begin:
#ifdef VIEW_SAVEPOINT
T_savepoint:
  skip;                        /* SAVEPOINT s: nothing of the transaction before it */
#endif
#ifndef VIEW_REG
  /* registry.rs unregister: the registry lock and P's lock EXCLUSIVE (lock_patiently), DELETE */
U1_registry_exclusive:
  reg_xq = 1;
  atomic { reg_s == 0 && !reg_x -> reg_x = 1; reg_xq = 0; hregx = 1 }
U2_projection_exclusive:
  p_xq = 1;
  atomic { p_s == 0 && !p_x -> p_x = 1; p_xq = 0; hpx = 1 }
U3_delete:
  d_step { txp = TX_DEL; chg = 1; FORGET_VIEW(0) }      /* the row is gone for this transaction only */
#else
  /* registry.rs register: G1 insert (private), G3 the registry lock EXCLUSIVE and the catch-up */
G1_insert:
  d_step { txp = TX_INS; chg = 1; FORGET_VIEW(0) }      /* the row exists for this transaction only */
G3_registry_exclusive:
  reg_xq = 1;
  atomic { reg_s == 0 && !reg_x -> reg_x = 1; reg_xq = 0; hregx = 1 }
G3_catchup:
  d_step { L = seq; apply_range(0, 0, L, MAXPOS, 0, pend, newcp); newcp = 0; L = 0 }
#endif
  ph = 1;

S_append:
  v_append(0, txp, chg, hregx, hpx, hreg, hp, hst, inlist, apply, vst, e, pend, pos);
#ifdef VIEW_SAVEPOINT
  if
  :: ph == 1 ->
T_rollback_to_savepoint:
     /* the change, the append's event and handler writes, and every lock taken since the savepoint
      * go; `chg` stays (BUMP_AT_COMMIT is per top-level transaction); so does the slot (not modelled) */
     d_step {
       v_abort(0); pend = 0; txp = 0;
       if :: hregx -> reg_x = 0 :: else -> skip fi;
       if :: hpx -> p_x = 0 :: else -> skip fi;
       hregx = 0; hpx = 0;
       v_unlock(0, hreg, hp, hst)
     }
     ph = 2;
     goto S_append
  :: else -> skip
  fi;
#endif
T_end:
  if
  :: true -> goto T_commit
  :: ph <= 2 -> goto T_rollback                  /* ROLLBACK (or an error, or a crash) */
  fi;

T_commit:
  skip;
  d_step {
#ifndef VIEW_REG
    if :: txp == TX_DEL -> check_copy(0) :: else -> skip fi;   /* (a) P's model as the unregistration takes it */
#endif
    v_commit(0, pend);
    if
    :: txp == TX_DEL -> status = ST_NONE; status_ver++
    :: txp == TX_INS -> status = ST_ACTIVE; status_ver++
    :: else -> skip
    fi;
    txp = 0
  }
T_callback:
  /* on_xact_event COMMIT: the epoch moves after the commit is visible, before the locks go */
  d_step {
#ifndef BUG_VIEW_NO_EPOCH_BUMP
    if :: chg -> repoch++ :: else -> skip fi;
#endif
    chg = 0;
    if :: hregx -> reg_x = 0 :: else -> skip fi;
    if :: hpx -> p_x = 0 :: else -> skip fi;
    hregx = 0; hpx = 0;
    v_unlock(0, hreg, hp, hst)
  }
  goto T_next;

T_rollback:
  /* the whole transaction goes; on_xact_event ABORT: BUMP_AT_COMMIT := false, no bump */
  skip;
  d_step {
    v_abort(0); pend = 0; txp = 0; chg = 0;
    if :: hregx -> reg_x = 0 :: else -> skip fi;
    if :: hpx -> p_x = 0 :: else -> skip fi;
    hregx = 0; hpx = 0;
    v_unlock(0, hreg, hp, hst)
  }

T_next:
  if
  :: ph < 2 + VAFTER -> ph = (ph < 3 -> 3 : ph + 1); goto S_append   /* BEGIN; ep_append; COMMIT */
  :: else -> skip
  fi;
  ph = 0;
  ndone++
}

/* another backend: VOTX transactions of one ep_append each, with its own kept view */
proctype backend(byte b)
{
  bool hreg, hp, hst, inlist, apply;
  byte vst, e, pend, pos, t;

B_append:
  v_append(b, 0, 0, 0, 0, hreg, hp, hst, inlist, apply, vst, e, pend, pos);
B_commit:
  d_step { v_commit(b, pend) }
B_release:
  d_step { v_unlock(b, hreg, hp, hst) }
  t++;
  if
  :: t < VOTX -> goto B_append
  :: else -> skip
  fi;
  t = 0;
  ndone++
}
#endif

/* ------------------------------------------------------------------ init + final check */
init {
  byte k;
  atomic {
    k = 0;
    do
    :: k <= MAXPOS -> evown[k] = INF; k++
    :: else -> break
    od;
    k = 0;
#if defined(HAS_REG) || (defined(SCEN_VIEW) && defined(VIEW_REG))
    status = ST_NONE;
#else
    status = ST_ACTIVE;
#endif
    status_ver = 1;
#if defined(SCEN_VIEW)
    /* every backend starts with a view kept from an earlier append (epoch 0) */
    do
    :: k < NAPP -> kv_ok[k] = 1; kv_ep[k] = 0; kv_st[k] = status; k++
    :: else -> break
    od;
    k = 1;
    run session();
    do
    :: k < NAPP -> run backend(k); k++
    :: else -> break
    od;
#else
    do
    :: k < NAPP -> run appender(k); k++
    :: else -> break
    od;
#endif
    k = 0;
#if defined(HAS_REG)
    run registrar();
#endif
#if defined(HAS_INPLACE) && !defined(SEEDS)
    run rebuild_inplace();
#elif defined(HAS_INPLACE) && defined(SEEDS)
    run rebuild_seeds();
#elif defined(SCEN_BG)
    run rebuild_bluegreen();
#elif defined(SCEN_ASYNC)
    run delivery();
#endif
#ifdef READER
    run reader();
#else
    rdone = 1;
#endif
  }
  /* (a): all processes done, the projection active (or the async one caught up) */
  (ndone == NAPP && wdone == NWORK && rdone);
  d_step {
#if defined(HAS_REG)
    if
    :: status == ST_NONE -> check_empty(0)      /* never registered: nothing applied */
    :: else -> assert(status == ST_ACTIVE); check_copy(0)
    fi
#elif defined(SCEN_VIEW)
    if
    :: status == ST_ACTIVE -> check_copy(0)
#ifdef VIEW_REG
    :: else -> check_empty(0)                   /* never registered: nothing applied */
#else
    :: else -> skip                             /* unregistered: complete at that commit, (e) since */
#endif
    fi
#elif defined(SCEN_BG)
    assert(status == ST_ACTIVE);
    check_copy(live)
#else
    assert(status == ST_ACTIVE);
    check_copy(0)
#endif
  }
}
