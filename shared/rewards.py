"""Rewards: a hash-chained double-entry ledger of integer micro-credits (grants, stakes, rewards, fees,
slashes), its offline verification and receipts, and the reputation that weighs governance votes.

Never use floats for money, never let a transaction's postings sum to anything but zero, and never append
an entry before it has been fully checked: a refused entry leaves the ledger exactly as it was.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from fractions import Fraction
from typing import Any

from shared.governance import (GENESIS_HASH, NODE_ID_PATTERN, GovernanceError, canonical_json, jsonable, sha256_hex,
                               signing_bytes)
from shared.rules import Decision

MICRO = 1_000_000  # micro-credits per credit
PPM = 1_000_000  # parts per million: quality, fee and slash fractions
MAX_AMOUNT = 2**53 - 1  # any posting or balance: exact even where JSON is read as a JS Number (dashboard)
MAX_TOKENS_PER_UPDATE = 10**12
MAX_POSTINGS = 8
MAX_MEMO_BYTES = 4096

MINT = "mint"  # issues every credit: its balance is minus the money supply, the only negative account
FEES = "fees"  # the coordinator's cut of rewards
SLASHED = "slashed"  # stake taken for misbehaviour; burned, never paid out by the ledger itself
STAKE_PREFIX = "stake:"  # "stake:<node>" holds the node's escrow while it is admitted
SYSTEM_ACCOUNTS = (MINT, FEES, SLASHED)
ENTRY_KINDS = ("grant", "stake", "unstake", "reward", "slash", "transfer")



class LedgerError(ValueError):
    """A ledger operation was refused (bad amount, unbalanced postings, insufficient funds, bad entry)."""


class InsufficientFunds(LedgerError):
    """A posting would take an account other than 'mint' below zero."""


def stake_account(node: str) -> str:
    return STAKE_PREFIX + check_node(node)


def check_node(node: Any) -> str:
    if not isinstance(node, str) or not NODE_ID_PATTERN.match(node) or node in SYSTEM_ACCOUNTS or node.startswith(STAKE_PREFIX):
        raise LedgerError(f"node id must be 1-128 characters of [A-Za-z0-9_.:+/=-], not a system name; got {node!r}")
    return node


def check_account(account: Any) -> str:
    if account in SYSTEM_ACCOUNTS:
        return account
    if isinstance(account, str) and account.startswith(STAKE_PREFIX):
        check_node(account[len(STAKE_PREFIX) :])
        return account
    return check_node(account)


def _check_int(value: Any, what: str, low: int = 0, high: int = MAX_AMOUNT) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise LedgerError(f"{what} must be an integer (micro-credits, never a float), got {value!r}")
    if not low <= value <= high:
        raise LedgerError(f"{what} must be in [{low}, {high}], got {value}")
    return value


@dataclass(frozen=True)
class Posting:
    """One leg of a transaction: a positive amount credits the account, a negative one debits it."""

    account: str
    amount: int

    def to_list(self) -> list:
        return [self.account, self.amount]


def check_postings(postings: Iterable[Posting | Sequence]) -> tuple[Posting, ...]:
    """Normalize and check: 2..MAX_POSTINGS legs, distinct accounts, nonzero integers, summing to zero."""
    legs = tuple(p if isinstance(p, Posting) else Posting(*p) for p in postings)
    if not 2 <= len(legs) <= MAX_POSTINGS:
        raise LedgerError(f"a transaction has 2 to {MAX_POSTINGS} postings, got {len(legs)}")
    for leg in legs:
        check_account(leg.account)
        _check_int(leg.amount, f"amount for {leg.account!r}", -MAX_AMOUNT, MAX_AMOUNT)
        if leg.amount == 0:
            raise LedgerError(f"zero posting to {leg.account!r}; leave it out")
    if len({leg.account for leg in legs}) != len(legs):
        raise LedgerError("an account appears twice in one transaction; merge its postings")
    total = sum(leg.amount for leg in legs)
    if total != 0:
        raise LedgerError(f"postings sum to {total}, not zero: money would be created or destroyed")
    return legs


@dataclass(frozen=True)
class LedgerEntry:
    """One transaction, chained to the one before.

    balances holds the post-transaction balance of every touched account, so that recomputing the log
    catches an entry that was dropped or edited even if someone re-hashed the chain after it.
    """

    seq: int
    prev: str
    kind: str
    round: int
    node: str  # the node the entry is about ("" for none)
    postings: tuple[Posting, ...]
    memo: dict
    balances: dict[str, int]
    hash: str

    def body(self) -> dict:
        return {
            "seq": self.seq,
            "prev": self.prev,
            "kind": self.kind,
            "round": self.round,
            "node": self.node,
            "postings": [p.to_list() for p in self.postings],
            "memo": self.memo,
            "balances": dict(sorted(self.balances.items())),
        }

    def compute_hash(self) -> str:
        return sha256_hex(canonical_json(self.body()))

    def to_dict(self) -> dict:
        return {**self.body(), "hash": self.hash}

    @classmethod
    def from_dict(cls, d: Mapping) -> LedgerEntry:
        """Parse a stored entry. Only the shape is checked here; check_chain() judges the content."""
        try:
            return cls(
                seq=d["seq"], prev=d["prev"], kind=d["kind"], round=d["round"], node=d["node"],
                postings=tuple(Posting(a, n) for a, n in d["postings"]), memo=dict(d["memo"]),
                balances=dict(d["balances"]), hash=d["hash"],
            )  # fmt: skip
        except (KeyError, TypeError, ValueError) as exc:
            raise LedgerError(f"malformed ledger entry: {exc}") from exc


@dataclass(frozen=True)
class RewardTerms:
    """The economics of a job, read from its governance params so that a vote can change them."""

    micro_per_token: int = 1
    fee_ppm: int = 50_000
    stake_micro: int = MICRO
    initial_grant_micro: int = 2 * MICRO
    slash_ppm: int = 500_000

    def __post_init__(self):
        _check_int(self.micro_per_token, "reward_micro_per_token", 0, MICRO)
        _check_int(self.fee_ppm, "fee_ppm", 0, PPM)
        _check_int(self.stake_micro, "stake_micro")
        _check_int(self.initial_grant_micro, "initial_grant_micro")
        _check_int(self.slash_ppm, "slash_ppm", 0, PPM)

    @classmethod
    def from_params(cls, params: Mapping[str, Any]) -> RewardTerms:
        names = {"micro_per_token": "reward_micro_per_token", "fee_ppm": "fee_ppm", "stake_micro": "stake_micro",
                 "initial_grant_micro": "initial_grant_micro", "slash_ppm": "slash_ppm"}  # fmt: skip
        return cls(**{field: params[key] for field, key in names.items() if key in params})

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _quality_fraction(quality: int | Fraction) -> Fraction:
    if isinstance(quality, bool) or not isinstance(quality, (int, Fraction)):
        raise LedgerError(f"quality must be int parts-per-million or a Fraction (see quality_to_ppm), got {quality!r}")
    q = Fraction(quality, PPM) if isinstance(quality, int) else quality
    if not 0 <= q <= 1:
        raise LedgerError(f"quality must lie in [0, 1] (0..{PPM} ppm), got {q}")
    return q


def quality_to_ppm(quality: float | Fraction | int) -> int:
    """A measured quality (e.g. relative loss improvement) as integer ppm, clamped to [0, 1], rounded down.

    Floats convert exactly (Fraction(float)), so every peer that sees the same float gets the same ppm.
    A NaN or infinite quality is 0: an update whose effect cannot be measured earns nothing.
    """
    if isinstance(quality, bool):
        raise LedgerError("quality must be a number, not a bool")
    try:
        q = Fraction(quality)
    except (TypeError, ValueError, OverflowError):
        if isinstance(quality, float):
            return 0
        raise LedgerError(f"quality must be a number, got {quality!r}") from None
    return int(min(max(q, Fraction(0)), Fraction(1)) * PPM)


def reward_amounts(tokens: int, quality: int | Fraction, terms: RewardTerms) -> tuple[int, int]:
    """(gross, fee) in micro-credits: gross = floor(tokens x micro_per_token x quality), fee = floor(gross x fee)."""
    _check_int(tokens, "tokens", 0, MAX_TOKENS_PER_UPDATE)
    q = _quality_fraction(quality)
    gross = tokens * terms.micro_per_token * q.numerator // q.denominator
    fee = gross * terms.fee_ppm // PPM
    return gross, fee


@dataclass(frozen=True)
class ChainFault:
    """The first entry of a ledger log that does not check out, and what is wrong with it."""

    index: int
    reason: str


class _Replay:
    """Balances rebuilt entry by entry; shared by Ledger.append and check_chain so both apply one rule."""

    def __init__(self):
        self.balances: dict[str, int] = {}

    def after(self, legs: tuple[Posting, ...]) -> dict[str, int]:
        post = {}
        for leg in legs:
            new = self.balances.get(leg.account, 0) + leg.amount
            if new < 0 and leg.account != MINT:
                raise InsufficientFunds(f"{leg.account!r} holds {self.balances.get(leg.account, 0)}, "
                                        f"cannot pay {-leg.amount}")  # fmt: skip
            if abs(new) > MAX_AMOUNT:
                raise LedgerError(f"{leg.account!r} balance would pass the ledger's limit of {MAX_AMOUNT}")
            post[leg.account] = new
        return post

    def commit(self, post: Mapping[str, int]) -> None:
        for account, value in post.items():
            if value == 0:
                self.balances.pop(account, None)
            else:
                self.balances[account] = value


def check_chain(entries: Sequence[LedgerEntry | Mapping], *, head: str | None = None,
                balances: Mapping[str, int] | None = None) -> ChainFault | None:  # fmt: skip
    """Recompute the whole log: sequence, links, hashes, zero-sum postings, and every post-balance.

    head (the last hash, e.g. from a signed round record) and balances (the stored balance table) anchor the
    end of the log: without one of them, dropping the newest entries cannot be told from never writing them.
    A fault at index len(entries) means the log is intact but shorter or different than its anchor.
    """
    replay, prev = _Replay(), GENESIS_HASH
    for i, raw in enumerate(entries):
        try:
            e = raw if isinstance(raw, LedgerEntry) else LedgerEntry.from_dict(raw)
            if e.seq != i:
                return ChainFault(i, f"sequence number {e.seq}, expected {i}: entries dropped or reordered")
            if e.prev != prev:
                return ChainFault(i, "prev hash does not match the entry before: an entry was dropped or edited")
            if e.compute_hash() != e.hash:
                return ChainFault(i, "hash does not match the entry's content: the entry was edited")
            if e.kind not in ENTRY_KINDS:
                return ChainFault(i, f"unknown entry kind {e.kind!r}")
            legs = check_postings(e.postings)
            post = replay.after(legs)
            if post != e.balances:
                return ChainFault(i, f"recorded balances {e.balances} differ from recomputed {post}")
        except (LedgerError, GovernanceError, TypeError, ValueError) as exc:
            return ChainFault(i, f"entry does not check: {exc}")
        replay.commit(post)
        prev = e.hash
    if head is not None and head != prev:
        return ChainFault(len(entries), "last hash differs from the anchored head: entries missing or replaced")
    if balances is not None and {k: v for k, v in balances.items() if v != 0} != replay.balances:
        return ChainFault(len(entries), "stored balances differ from the balances recomputed from the log")
    return None


def verify_chain(entries: Sequence[LedgerEntry | Mapping], *, head: str | None = None,
                 balances: Mapping[str, int] | None = None) -> int | None:  # fmt: skip
    """Index of the first bad entry, or None when the log and its anchors are intact. See check_chain."""
    fault = check_chain(entries, head=head, balances=balances)
    return None if fault is None else fault.index


def receipt_bytes(entry: LedgerEntry | Mapping) -> bytes:
    """The bytes the coordinator signs for a node's receipt; the node checks the signature offline."""
    e = entry if isinstance(entry, LedgerEntry) else LedgerEntry.from_dict(entry)
    return signing_bytes("receipt", e.to_dict())


def check_receipt(entry: LedgerEntry | Mapping, node: str) -> LedgerEntry:
    """Check a receipt's content before checking its signature: hash, zero-sum postings, and that it pays
    or charges `node`. Returns the parsed entry; raises LedgerError when anything is off."""
    e = entry if isinstance(entry, LedgerEntry) else LedgerEntry.from_dict(entry)
    if e.compute_hash() != e.hash:
        raise LedgerError("receipt hash does not match its content")
    legs = check_postings(e.postings)
    if e.node != node or not any(leg.account in (node, stake_account(node)) for leg in legs):
        raise LedgerError(f"receipt is not about node {node!r}")
    if set(e.balances) != {leg.account for leg in legs}:
        raise LedgerError("receipt balances do not cover exactly its postings")
    return e


class Ledger:
    """The job's ledger: append-only entries and the balances they imply.

    Joining costs and pays nothing. A node's first verified update earns it initial_grant_micro from 'mint'
    once (grant); from then on its stake is posted to escrow 'stake:<node>' out of what it holds (stake),
    returns when it leaves cleanly (unstake), and part of it moves to 'slashed' when an update breaks a rule
    marked slash (slash). Credits are earned by training, never bought, and a new key mints nothing. Rewards are minted: the node
    gets gross - fee, 'fees' gets the fee.
    """

    def __init__(self):
        self.entries: list[LedgerEntry] = []
        self._replay = _Replay()
        self._granted: set[str] = set()

    @classmethod
    def from_entries(cls, entries: Iterable[LedgerEntry | Mapping]) -> Ledger:
        """Rebuild from a stored log, refusing one that does not verify (use check_chain to report why)."""
        parsed = [e if isinstance(e, LedgerEntry) else LedgerEntry.from_dict(e) for e in entries]
        fault = check_chain(parsed)
        if fault is not None:
            raise LedgerError(f"ledger entry {fault.index} is bad: {fault.reason}")
        ledger = cls()
        for e in parsed:
            ledger._replay.commit(e.balances)
            if e.kind == "grant":
                ledger._granted.add(e.node)
        ledger.entries = parsed
        return ledger

    @property
    def head(self) -> str:
        return self.entries[-1].hash if self.entries else GENESIS_HASH

    def balances(self) -> dict[str, int]:
        """Every nonzero balance. They always sum to zero: 'mint' holds minus the money in circulation."""
        return dict(sorted(self._replay.balances.items()))

    def balance(self, account: str) -> int:
        return self._replay.balances.get(check_account(account), 0)

    def stake_of(self, node: str) -> int:
        return self.balance(stake_account(node))

    def append(self, kind: str, postings: Iterable[Posting | Sequence], *, round: int, node: str = "",
               memo: Mapping | None = None) -> LedgerEntry:  # fmt: skip
        """Check and append one transaction. Raises LedgerError (or InsufficientFunds) and changes nothing."""
        if kind not in ENTRY_KINDS:
            raise LedgerError(f"entry kind must be one of {ENTRY_KINDS}, got {kind!r}")
        _check_int(round, "round", 0, 2**62)
        if node:
            check_node(node)
        legs = check_postings(postings)
        memo_json = jsonable(dict(memo or {}))
        try:
            size = len(canonical_json(memo_json))
        except GovernanceError as exc:
            raise LedgerError(f"memo is not JSON: {exc}") from exc
        if size > MAX_MEMO_BYTES:
            raise LedgerError(f"memo is {size} bytes, limit {MAX_MEMO_BYTES}")
        post = self._replay.after(legs)
        entry = LedgerEntry(len(self.entries), self.head, kind, round, node, legs, memo_json, post, "")
        entry = dataclasses.replace(entry, hash=entry.compute_hash())
        self._replay.commit(post)
        self.entries.append(entry)
        return entry

    def grant(self, node: str, *, round: int, terms: RewardTerms) -> LedgerEntry | None:
        """The one-time start grant; None if it was granted before (or the grant is 0). The coordinator pays it
        after the node's first verified update, never for joining, so that a new key mints nothing."""
        check_node(node)
        if node in self._granted or terms.initial_grant_micro == 0:
            return None
        entry = self.append("grant", [(MINT, -terms.initial_grant_micro), (node, terms.initial_grant_micro)],
                            round=round, node=node, memo={"reason": "start grant for the first verified update"})
        self._granted.add(node)
        return entry

    def post_stake(self, node: str, *, round: int, terms: RewardTerms) -> LedgerEntry | None:
        """Top the node's escrow up to stake_micro (after a slash it owes the difference). None if full."""
        owed = terms.stake_micro - self.stake_of(node)
        if owed <= 0:
            return None
        return self.append("stake", [(node, -owed), (stake_account(node), owed)], round=round, node=node,
                           memo={"stake_micro": terms.stake_micro})  # fmt: skip

    def release_stake(self, node: str, *, round: int) -> LedgerEntry | None:
        """Return the whole escrow to a node that leaves in good standing. None if it holds none."""
        held = self.stake_of(node)
        if held == 0:
            return None
        return self.append("unstake", [(stake_account(node), -held), (node, held)], round=round, node=node)

    def reward(self, node: str, *, tokens: int, quality: int | Fraction, round: int, terms: RewardTerms,
               memo: Mapping | None = None) -> LedgerEntry | None:  # fmt: skip
        """Mint the reward for one accepted update: node gets gross - fee, 'fees' gets the fee.

        quality is int ppm or an exact Fraction in [0, 1]. None when the reward rounds to zero.
        """
        check_node(node)
        gross, fee = reward_amounts(tokens, quality, terms)
        if gross == 0:
            return None
        # zero legs are left out: a 0% fee has no 'fees' leg, a 100% fee no node leg
        legs = [(MINT, -gross)] + [(acct, n) for acct, n in ((node, gross - fee), (FEES, fee)) if n]
        q = _quality_fraction(quality)
        info = {"tokens": tokens, "quality": f"{q.numerator}/{q.denominator}", "gross": gross, "fee": fee}
        return self.append("reward", legs, round=round, node=node, memo={**(memo or {}), **info})

    def slash(self, node: str, *, round: int, terms: RewardTerms, rule_ids: Sequence[str],
              memo: Mapping | None = None) -> LedgerEntry | None:  # fmt: skip
        """Move slash_ppm of the node's escrow to 'slashed' for breaking rules marked slash. None if nothing
        is held (a node that never staked cannot be admitted, so that means it was already slashed empty)."""
        if not rule_ids or not all(isinstance(r, str) and r for r in rule_ids):
            raise LedgerError("a slash must name the rule ids that were broken")
        amount = self.stake_of(node) * terms.slash_ppm // PPM
        if amount == 0:
            return None
        return self.append("slash", [(stake_account(node), -amount), (SLASHED, amount)], round=round, node=node,
                           memo={**(memo or {}), "rule_ids": list(rule_ids)})  # fmt: skip

    def to_list(self) -> list[dict]:
        return [e.to_dict() for e in self.entries]

    @classmethod
    def from_list(cls, items: Iterable[Mapping]) -> Ledger:
        return cls.from_entries(items)


# ---------------------------------------------------------------------------------------------------
# Reputation: earned by accepted updates, lost by discarded, rejected and slashed ones. Stake and balance
# never enter it, so voting weight cannot be bought.

REPUTATION_OUTCOMES = ("accepted", "discarded", "rejected", "slashed")
ACCEPTED_MAX_POINTS = 10  # an accepted update at quality 1; at least 1 point at any quality
DISCARDED_POINTS = -2  # dropped by staleness or trimmed by the aggregator: honest but wasted
REJECTED_POINTS = -20  # broke a rule that does not mark misbehaviour
SLASHED_POINTS = -100  # broke a rule marked slash
MAX_REPUTATION = 10**12


def reputation_delta(outcome: str, quality: int | Fraction = PPM) -> int:
    """Points for one update outcome. quality (ppm or Fraction) scales an accepted update's points."""
    if outcome == "accepted":
        q = _quality_fraction(quality)
        return max(1, ACCEPTED_MAX_POINTS * q.numerator // q.denominator)
    if outcome == "discarded":
        return DISCARDED_POINTS
    if outcome == "rejected":
        return REJECTED_POINTS
    if outcome == "slashed":
        return SLASHED_POINTS
    raise LedgerError(f"outcome must be one of {REPUTATION_OUTCOMES}, got {outcome!r}")


class Reputation:
    """Integer reputation per node. A node the coordinator has never seen has 0."""

    def __init__(self, scores: Mapping[str, int] | None = None):
        self._scores: dict[str, int] = {}
        for node, score in (scores or {}).items():
            self._scores[check_node(node)] = _check_int(score, f"reputation of {node!r}", -MAX_REPUTATION,
                                                        MAX_REPUTATION)  # fmt: skip

    def __getitem__(self, node: str) -> int:
        return self._scores.get(node, 0)

    def record(self, node: str, outcome: str, quality: int | Fraction = PPM) -> int:
        """Apply one update's outcome; returns the node's new reputation."""
        check_node(node)
        new = self[node] + reputation_delta(outcome, quality)
        self._scores[node] = max(-MAX_REPUTATION, min(MAX_REPUTATION, new))
        return self._scores[node]

    def weights(self) -> dict[str, int]:
        """Voting weights: reputation, with negative reputation counting as zero."""
        return {node: max(0, s) for node, s in sorted(self._scores.items())}

    def snapshot(self) -> dict[str, int]:
        return dict(sorted(self._scores.items()))

    def below(self, floor: int | float) -> list[str]:
        return sorted(node for node, s in self._scores.items() if s < floor)

    def to_dict(self) -> dict:
        return {"scores": self.snapshot()}

    @classmethod
    def from_dict(cls, d: Mapping) -> Reputation:
        return cls(d.get("scores", {}))


# ---------------------------------------------------------------------------------------------------
# One update's outcome, booked the same way by every peer that replays a round.


def settle_update(ledger: Ledger, reputation: Reputation, node: str, decision: Decision, *, round: int,
                  terms: RewardTerms, tokens: int = 0, quality: int | Fraction = 0, aggregated: bool = True,
                  memo: Mapping | None = None, earns_reputation: bool = True) -> list[LedgerEntry]:  # fmt: skip
    """Book an update after governance decided on it (and, if allowed, the aggregator used it or not).

    allowed and aggregated       -> reward (tokens x quality, less the fee), reputation "accepted"
    allowed but not aggregated   -> no money, reputation "discarded" (late, or trimmed by a robust rule)
    blocked by a rule with slash -> slash of the escrow naming those rules, reputation "slashed"
    blocked otherwise            -> no money, reputation "rejected"
    earns_reputation False keeps an allowed, aggregated update's reputation where it is (the coordinator's
    policy for work not yet verified: see Governor.settle). The ledger entry is made first, so a refused entry
    leaves reputation untouched too.
    """
    if decision.action != "update":
        raise LedgerError(f"settle_update books update decisions, got a {decision.action!r} decision")
    if decision.allowed and aggregated:
        entry = ledger.reward(node, tokens=tokens, quality=quality, round=round, terms=terms, memo=memo)
        if earns_reputation:
            reputation.record(node, "accepted", quality)
        return [entry] if entry is not None else []
    if decision.allowed:
        check_node(node)
        reputation.record(node, "discarded")
        return []
    if decision.slash:
        rule_ids = [v.rule_id for v in decision.verdicts if v.slash and not v.passed]
        entry = ledger.slash(node, round=round, terms=terms, rule_ids=rule_ids, memo=memo)
        reputation.record(node, "slashed")
        return [entry] if entry is not None else []
    check_node(node)
    reputation.record(node, "rejected")
    return []


# ---------------------------------------------------------------------------------------------------
# Auditing a job's books from its data alone: the signed round anchors and every reward recomputed from the
# update it pays for. docs/LEDGER.md writes the same rules down for verifiers outside this project.


def round_record_bytes(round: int, model_hash: str, ledger_head: str) -> bytes:
    """The bytes the coordinator signs for a committed round: it vouches for the model and for the ledger up
    to ledger_head (the hash of the last entry committed with the round; "" or the genesis hash for none)."""
    return signing_bytes("round", {"round": round, "model_hash": model_hash, "ledger_head": ledger_head})


def check_anchors(entries: Sequence[LedgerEntry | Mapping], heads: Sequence[tuple[int, str]]) -> ChainFault | None:
    """Check the round records' ledger heads, in round order, against the log.

    Each head is an entry's hash ("" or the genesis hash before the first entry), a later round's head never
    lies before an earlier one's, and the last round's head is the last entry's hash: with the heads signed,
    an entry dropped from the end, or one appended that no round committed, shows here.
    """
    hashes = [e.hash if isinstance(e, LedgerEntry) else e.get("hash") for e in entries]
    position = {h: i for i, h in enumerate(hashes)}
    last = -1
    for round_, head in heads:
        at = -1 if head in ("", GENESIS_HASH) else position.get(head)
        if at is None:
            return ChainFault(len(entries), f"round {round_}'s ledger head {head[:16]}... is not the hash of any "
                                            "entry: entries were dropped or replaced")  # fmt: skip
        if at < last:
            return ChainFault(max(at, 0), f"round {round_}'s ledger head points back to entry {at}, before the "
                                          f"previous round's entry {last}")  # fmt: skip
        last = at
    if last != len(entries) - 1:
        return ChainFault(last + 1, f"the last round's ledger head is entry {last}, but the log has {len(entries)} "
                                    "entries: no signed round commits the ones after it")  # fmt: skip
    return None


def params_in_force(params: Mapping[str, Any], audit: Sequence[Mapping], round: int) -> dict:
    """The job parameters that booked the entries of `round`: `params` (the governance state after the last
    committed round) with every set_param change that took effect at `round` or later undone, newest first.

    A change of round r takes effect at the boundary that opens round r, after the round's updates were
    booked (Governor.settle runs before Governor.boundary), so round r's rewards still use the old value.
    audit holds the governance audit log's entries (shared.governance.AuditEntry.to_dict()). Raises
    LedgerError when the log's changes do not lead to `params`.
    """
    current = dict(params)
    for entry in reversed(audit):
        if entry.get("kind") != "change" or entry.get("action") != "set_param" or entry.get("round", -1) < round:
            continue
        name, detail = entry.get("subject"), entry.get("detail") or {}
        if name not in current or current[name] != detail.get("after"):
            raise LedgerError(f"the audit log's change of {name!r} at round {entry.get('round')} does not lead to "
                              f"the value in force ({current.get(name)!r}); the governance state was edited")
        current[name] = detail.get("before")
    return current


def terms_by_round(params: Mapping[str, Any], audit: Sequence[Mapping],
                   rounds: Iterable[int]) -> dict[int, RewardTerms]:  # fmt: skip
    """The reward terms that booked each of `rounds`, reconstructed as params_in_force() describes."""
    return {r: RewardTerms.from_params(params_in_force(params, audit, r)) for r in rounds}


def _reward_postings(node: str, gross: int, fee: int) -> dict[str, int]:
    legs = {MINT: -gross, node: gross - fee, FEES: fee}
    return {account: amount for account, amount in legs.items() if amount}


def check_rewards(entries: Sequence[LedgerEntry | Mapping], updates: Iterable[Mapping],
                  terms: Mapping[int, RewardTerms]) -> ChainFault | None:  # fmt: skip
    """Recompute every reward from the update record it pays for.

    updates are the store's update records as mappings with node_id, committed_round (the round record they
    were committed with, which is the round their rewards are booked under), accepted, aggregated, tokens and
    quality_ppm. terms maps each round to the RewardTerms in force (see terms_by_round). Every reward entry must
    pay one accepted, aggregated update of its node committed with its round, with the memo's tokens and quality
    equal to the record's, and postings gross = floor(tokens x micro_per_token x quality) minted, of which
    fee = floor(gross x fee_ppm / 1e6) goes to 'fees'. Every such update whose gross is not zero must be paid.
    A fault at index len(entries) names an update that no entry pays.
    """
    owed: dict[tuple[int, str], list[tuple[int, int]]] = {}  # (round, node) -> [(tokens, quality ppm)]
    for u in updates:
        if u["accepted"] and u["aggregated"]:
            owed.setdefault((u["committed_round"], u["node_id"]), []).append((u["tokens"], u["quality_ppm"]))
    for i, raw in enumerate(entries):
        try:
            e = raw if isinstance(raw, LedgerEntry) else LedgerEntry.from_dict(raw)
            if e.kind != "reward":
                continue
            if e.round not in terms:
                return ChainFault(i, f"reward booked under round {e.round}, which no round record commits")
            tokens, quality = e.memo.get("tokens"), Fraction(str(e.memo.get("quality")))
            candidates = owed.get((e.round, e.node), [])
            paid = next((c for c in candidates if c[0] == tokens and Fraction(c[1], PPM) == quality), None)
            if paid is None:
                return ChainFault(i, f"reward to {e.node} under round {e.round} (tokens {tokens}, quality {quality}) "
                                     "pays no accepted, aggregated update of that node committed with that round")
            candidates.remove(paid)
            gross, fee = reward_amounts(paid[0], paid[1], terms[e.round])
            postings = {leg.account: leg.amount for leg in e.postings}
            booked = (postings, e.memo.get("gross"), e.memo.get("fee"))
            if booked != (_reward_postings(e.node, gross, fee), gross, fee):
                t = terms[e.round]
                return ChainFault(i, f"reward to {e.node} under round {e.round} does not follow the formula: "
                                     f"{tokens} tokens x {t.micro_per_token} micro/token x quality {quality} gives "
                                     f"gross {gross} and fee {fee} (fee_ppm {t.fee_ppm}), but the entry books "
                                     f"{postings} with memo gross {e.memo.get('gross')} and fee {e.memo.get('fee')}")
        except (LedgerError, GovernanceError, TypeError, ValueError, ZeroDivisionError) as exc:
            return ChainFault(i, f"reward entry does not check: {exc}")
    for (round_, node), left in owed.items():
        for tokens, quality_ppm in left:
            where = f"the accepted, aggregated update of {node} committed with round {round_}"
            if round_ not in terms:
                return ChainFault(len(entries), f"{where}: no round record of that round")
            try:
                gross = reward_amounts(tokens, quality_ppm, terms[round_])[0]
            except LedgerError as exc:
                return ChainFault(len(entries), f"{where} does not check: {exc}")
            if gross:
                return ChainFault(len(entries), f"{where} ({tokens} tokens, quality {quality_ppm} ppm) was never paid")
    return None
