"""Which 429s are about our rate: a limit's refusals fall when the rate is cut, sporadic ones do not.

An aggregator refuses some requests because an upstream provider sheds load at that moment,
whatever our rate; cutting the rate for those only slows the run, and since cutting does not
stop them, the rate never finds its way back. One response cannot tell the two apart (the
vendor documents no header or body that says which), but the rate can:

* **A trial.** A refusal nothing explains yet is treated as a limit's (the request budget
  pauses everyone and cuts the rate, as ever), and the cut is put on trial: the refusal share
  of the requests admitted after it is compared with the share before it (the last `RECENT`
  answers and the requests in flight at the cut; short of `RECENT`, the missing answers count
  as successes: one early refusal says little about a share).
* **Sporadic verdict.** When at least `MIN_REFUSALS` requests admitted after the cut were
  refused anyway, at a share not significantly lower than before (a one-sided two-proportion
  test at `Z` standard errors) and at most `MAX_SHARE` (most requests refused is never
  sporadic), the cut did not help: the budget restores the rate it had before the trial and
  lifts the pause, and the share after the cut is learnt (at most `MAX_LEARNT`).
* **A run's first window** (`young`, first trial only) needs no cut to judge: nothing has
  left the window yet, so every request sent after the refused one went at a higher count.
  A limit of our own traffic refuses them all; when `YOUNG_ACCEPTED` of them were accepted,
  the refusal was not about the count. When the first window ends undecided, its requests
  join the share before the cut, and the trial goes on as any other.
* **Limit verdict.** When enough requests went after the cut that a sporadic share would have
  shown twice over and it did not, the cut helped: a limit, and the budget goes on as today
  (AIMD; further refusals are new congestion events).
* **Learnt share.** Once a share is learnt, a refusal is sporadic while the refusals among
  the last `RECENT` answers stay within what that share explains (mean + 2 sd + 1). Beyond
  that a trial starts again, a stricter one: a limit met beside sporadic refusals leaves
  fewer refusals after the cut, not none, and the server's window holds what went before the
  cut for a window. So the requests of the first window after the cut only have to stay
  within the share that set the trial off, and a sporadic verdict then takes `MIN_ANSWERS`
  answers after it at no less than `SAME` of the share before. The share follows sporadic
  refusals and successes (an EWMA over about `RECENT` answers) but never rises above
  `CEILING` times what a verdict learnt: only a new trial raises it.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass
from enum import Enum


class Verdict(Enum):
    """What the request budget does about one refusal."""

    SPORADIC = "sporadic"  # that request alone waits: no pause, no cut
    RESTORE = "restore"  # the trial's cut did not help: restore the rate, lift the pause
    EVENT = "event"  # a (possible) limit: pause everyone and cut, a new congestion event
    BURST = "burst"  # part of a congestion event already handled: extend the pause only


@dataclass
class Trial:
    """A rate cut under test: the refusals before it and after it."""

    seq: int  # leases from this seq on count as after the cut
    young_until: float | None  # a first-window trial: only leases admitted before this count
    settle_at: float | None  # leases admitted before this are not "after the cut" yet
    pre_refused: int
    pre_answered: int
    post_refused: int = 0
    post_answered: int = 0
    settling_refused: int = 0  # after the cut, before settle_at
    settling_answered: int = 0
    held: int = 1  # refusals counted against the limit while the trial is open

    @property
    def post_share(self) -> float:
        return self.post_refused / max(1, self.post_answered)


class RefusalJudge:
    """Tells the request budget which refusals follow the rate; counts each kind."""

    MIN_REFUSALS = 3  # refusals after a cut before it can be judged useless
    MIN_ANSWERS = 30  # answers after a cut beyond a learnt share before it can be judged
    SAME = 0.75  # ... and the share after it at least this fraction of the share before
    YOUNG_ACCEPTED = 2  # first-window requests accepted after the refused one: not the count
    Z = 2.0  # a share after the cut this many standard errors lower fell: the cut helped
    MAX_SHARE = 0.5  # a larger share of refusals is never sporadic
    MAX_LEARNT = 0.25  # a learnt share never explains more than this one does
    RECENT = 50  # answers the recent share is measured over
    ALPHA = 1.0 / RECENT  # weight of one answer in the learnt share
    CEILING = 1.5  # the learnt share rises to at most this times the share a verdict learnt

    def __init__(self) -> None:
        self.recent: deque[bool] = deque(maxlen=self.RECENT)  # refused? of the last answers
        self.share: float | None = None  # the learnt sporadic share; None: none learnt yet
        self.ceiling = 0.0  # the learnt share rises no higher (set by each sporadic verdict)
        self.trial: Trial | None = None
        self.limit = 0  # refusals attributed to a limit (`rate_limited`)
        self.sporadic = 0  # refusals that did not follow the rate (`refused_sporadic`)

    def open(self, seq: int, now: float, window: float,
             young: tuple[int, float] | None = None) -> bool:
        """Put the cut just made on trial, unless one is open (then False): answers of leases
        from `seq` on are those after it. `young` (in a run's first window: the seq after
        the refused lease's, and when the window ends): see the module docstring. A trial
        of refusals beyond a learnt share waits a `window` before it counts: until then the
        server's window still holds what went before the cut."""
        if self.trial is not None:
            return False
        young_until = settle_at = None
        if self.share is not None:
            settle_at = now + window
        elif young is not None:
            seq, young_until = young
        self.trial = Trial(seq, young_until, settle_at, sum(self.recent), len(self.recent))
        return True

    def answered(self, seq: int, refused: bool, admitted_at: float) -> bool:
        """Note an answer (ok or 429) of the lease admitted as `seq` at `admitted_at`; True
        when it settles the open trial as useless (the budget then restores its rate)."""
        self.recent.append(refused)
        trial = self.trial
        if trial is None:
            if not refused:
                self._learn(False)
            return False
        if seq < trial.seq:
            trial.pre_answered += 1
            trial.pre_refused += refused
            return False
        if trial.settle_at is not None and admitted_at < trial.settle_at:
            trial.settling_answered += 1
            trial.settling_refused += refused
            return False
        if trial.young_until is not None and admitted_at >= trial.young_until:
            # the first window ended undecided: what it saw was before the cut took hold
            trial.pre_answered += trial.post_answered
            trial.pre_refused += trial.post_refused
            trial.post_answered = trial.post_refused = 0
            trial.young_until = None
        trial.post_answered += 1
        trial.post_refused += refused
        if trial.young_until is not None:
            accepted = trial.post_answered - trial.post_refused
            if accepted >= self.YOUNG_ACCEPTED:
                self._settle_sporadic(trial, 0, sum(self.recent) / len(self.recent))
                return True
        elif not refused and trial.post_answered >= self._confirm_after(trial):
            self.trial = None  # the cut helped: a limit (its refusals stay counted so)
            self.recent.clear()  # and the share before it no longer says what comes
        return False

    def refused(self, seq: int, admitted_at: float, *, stale: bool) -> Verdict:
        """Judge a refusal already noted with `answered`; `stale`: its lease was admitted
        before the budget's last congestion event."""
        trial = self.trial
        after = trial is not None and seq >= trial.seq
        settling = after and trial.settle_at is not None and admitted_at < trial.settle_at
        post = after and not settling
        if trial is not None and post and trial.young_until is None and self._useless(trial):
            self._settle_sporadic(trial, 1, trial.post_share)
            return Verdict.RESTORE
        # the sample the learnt share must explain: since the cut on trial, else the recent
        if trial is None:
            explained = self._explained(sum(self.recent), len(self.recent))
        elif settling:  # the cut is given its window: judged by the share that set it off
            explained = self._explained(trial.settling_refused, trial.settling_answered,
                                        trial.pre_refused / max(1, trial.pre_answered))
        else:
            explained = post and self._explained(trial.post_refused, trial.post_answered)
        if explained:
            self.sporadic += 1
            self._learn(True)
            return Verdict.SPORADIC
        self.limit += 1
        if trial is not None:
            trial.held += 1
        return Verdict.BURST if stale else Verdict.EVENT

    # ---- the rules

    def _settle_sporadic(self, trial: Trial, extra: int, share: float) -> None:
        """The trial's refusals (and `extra` more) were sporadic, at `share`."""
        self.trial = None
        self.limit -= trial.held
        self.sporadic += trial.held + extra
        self.share = min(share, self.MAX_LEARNT)
        self.ceiling = min(max(self.CEILING * share, 2.0 / self.RECENT), self.MAX_LEARNT)

    def _useless(self, trial: Trial) -> bool:
        """Enough refusals after the cut, at a share not significantly below the one before
        it, and not most requests. Beyond a learnt share (`settle_at` set) it takes more:
        `MIN_ANSWERS` answers and `SAME` of the share before, since a cut that was too small
        for a limit leaves refusals too, only fewer."""
        post = trial.post_share
        if trial.post_refused < self.MIN_REFUSALS or post > self.MAX_SHARE:
            return False
        if trial.settle_at is not None and (
                trial.post_answered < self.MIN_ANSWERS
                or post < self.SAME * trial.pre_refused / max(1, trial.pre_answered)):
            return False
        n1, n2 = max(self.RECENT, trial.pre_answered), trial.post_answered
        pooled = (trial.pre_refused + trial.post_refused) / (n1 + n2)
        se = math.sqrt(pooled * (1.0 - pooled) * (1.0 / n1 + 1.0 / n2))
        return trial.pre_refused / n1 - post < self.Z * se

    def _confirm_after(self, trial: Trial) -> int:
        """Answers after the cut by which a sporadic share would have shown twice over."""
        pre = trial.pre_refused / max(self.RECENT, trial.pre_answered)
        return math.ceil(2 * self.MIN_REFUSALS / max(0.5 * pre, 1.0 / self.RECENT))

    def _explained(self, refused: int, n: int, share: float = 0.0) -> bool:
        """The learnt share (or `share` when larger) explains `refused` refusals among `n`."""
        if self.share is None:
            return False
        p = min(self.MAX_SHARE, max(self.share, share))
        return refused <= n * p + 2.0 * math.sqrt(n * p * (1.0 - p)) + 1.0

    def _learn(self, refused: bool) -> None:
        if self.share is not None:
            self.share = min(self.ceiling, self.share + self.ALPHA * (float(refused) - self.share))
