/* model/delete.pml: a hard delete of a stream against concurrent appends to it, a handler of the
 * marker that appends from inside the deleting transaction, and an async reader (DESIGN.md,
 * section 16; code: src/log/delete.rs, Purpose in src/log/mod.rs).
 *
 * One stream. Every append and the delete take the stream's row lock (A7) and read its mark
 * under it; the delete's marker, its handler (HANDLER_APPENDS: the handler appends to the same
 * stream, in the same transaction, past the lock it already holds), the removal of every event
 * below the marker and the mark commit together. The reader delivers positions in order, never
 * past one that is not committed yet (the high-water mark), applying "count the stream's events;
 * a hard marker forgets them". Checked at the end:
 *   - no event of the stream is committed above its hard marker;
 *   - the reader's model equals a replay of what is left of the log.
 * BUG_MARK_AFTER_HANDLERS sets the mark after the marker's handlers ran (the first version):
 * the handler's append is then let through above the marker, and the first property fails.
 * BUG_MARK_BEFORE_LOCK reads the mark before the row lock: an append waiting for the lock
 * while the delete runs writes above the marker. */

#ifndef NAPP
#define NAPP 2
#endif
#define N (NAPP + 3)           /* positions: the appends, the marker, a handler's append */

#define EV 1
#define MARKER 2

byte kind[N + 1];              /* 0: position not taken */
bool committed[N + 1];
bool removed[N + 1];
byte next = 1;                 /* the position sequence */
byte lock = 0;                 /* the stream's row lock: holder's _pid + 1, 0 when free */
bool hard_mark = false;        /* committed ep.streams.deleted = 'hard' */
bool pending_mark = false;     /* the deleting transaction's own, uncommitted mark */
byte marker = 0;
byte finished = 0;

inline take(pos, k) {
  atomic { pos = next; next++; kind[pos] = k }
}

proctype Appender() {
  byte p;
  bool seen;
#ifdef BUG_MARK_BEFORE_LOCK
  seen = hard_mark;                                  /* the mark read before the lock */
#endif
  atomic { lock == 0 -> lock = _pid + 1 }            /* A7: the row lock */
#ifndef BUG_MARK_BEFORE_LOCK
  seen = hard_mark;                                  /* ... and under it, with the new version */
#endif
  if
  :: seen -> skip                                    /* refused: nothing written */
  :: else ->
     take(p, EV);                                    /* A8, A9 */
     committed[p] = true                             /* A11 */
  fi;
  lock = 0;
  finished++
}

proctype Deleter() {
  byte m, q, i;
  atomic { lock == 0 -> lock = _pid + 1 }            /* the marker's A7 */
#ifndef BUG_MARK_AFTER_HANDLERS
  pending_mark = true;                               /* the mark, under the lock, before A10 */
#endif
  take(m, MARKER);
  marker = m;
#ifdef HANDLER_APPENDS
  /* A10: the marker's handler calls ep_append on the stream. Same transaction: the row lock is
   * already its own, and it sees its own uncommitted mark. */
  if
  :: pending_mark -> skip                            /* refused (55000) */
  :: else -> take(q, EV)
  fi;
#endif
#ifdef BUG_MARK_AFTER_HANDLERS
  pending_mark = true;
#endif
  /* removal of every event below the marker, then the commit of all of it at once */
  atomic {
    i = 1;
    do
    :: i < m -> removed[i] = true; i++
    :: else -> break
    od;
    committed[m] = true;
    if :: q > 0 -> committed[q] = true :: else -> skip fi;
    hard_mark = pending_mark
  }
  lock = 0;
  finished++
}

byte model = 0;                                      /* the reader's count */

proctype Reader() {
  byte k = 1, i, replay = 0;
  do
  :: k < next && committed[k] ->                     /* below the high-water mark */
     atomic {
       if
       :: removed[k] -> skip                         /* gone before it was read */
       :: kind[k] == EV -> model++
       :: kind[k] == MARKER -> model = 0
       fi;
       k++
     }
  :: finished == NAPP + 1 && k == next -> break
  od;
  /* the checks, once everything has ended */
  i = 1;
  do
  :: i < next ->
     if
     :: !removed[i] && kind[i] == EV -> replay++;
        assert(marker == 0 || i < marker)            /* no event above the hard marker */
     :: !removed[i] && kind[i] == MARKER -> replay = 0
     :: else -> skip
     fi;
     i++
  :: else -> break
  od;
  assert(model == replay)
}

init {
  atomic {
    byte a = 0;
    do
    :: a < NAPP -> run Appender(); a++
    :: else -> break
    od;
    run Deleter();
    run Reader()
  }
}
