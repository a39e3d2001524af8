"""Governance: the rules in force, a hash-chained audit log of what they blocked, and signed proposals
decided by reputation-weighted votes that take effect at round boundaries. Also the canonical bytes that
every peer hashes and signs.

Never use floats to decide a vote (quorum and threshold are exact Fractions), never let a change take
effect mid-round, and never mutate state before an input is fully checked.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import math
import re
import tomllib
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Any

from shared import identity
from shared.rules import (  # noqa: F401  (re-exported: governance is the entry point for rules too)
    ACTIONS,
    MAX_REASON_CHARS,
    OPS,
    PARAM_NAME,
    Bounds,
    ConditionError,
    Decision,
    GovernanceError,
    MissingParamError,
    ParamTypeError,
    Rule,
    Rulebook,
    Verdict,
    check_condition,
    condition_params,
    evaluate,
    is_number,
    validate,
)

PROPOSAL_KINDS = ("add_rule", "remove_rule", "change_rule", "set_param")
PROPOSAL_STATES = ("open", "applied", "rejected", "expired", "failed")
MAX_OPEN_PROPOSALS = 128  # open at once, all proposers together
MAX_OPEN_PROPOSALS_PER_NODE = 4  # so that one proposer cannot use up the global limit for everyone else
MAX_VOTES_PER_NODE_PER_ROUND = 64  # votes one node may stamp with any one round
STAMP_TOLERANCE_ROUNDS = 1  # a proposal or vote is stamped with the current round, give or take this many

GENESIS_HASH = "0" * 64
DEFAULT_RULES_PATH = Path(__file__).with_name("default_rules.toml")

NODE_ID_PATTERN = re.compile(r"^[A-Za-z0-9_.:+/=-]{1,128}$")  # governance and ledger accounts alike


class ProposalError(GovernanceError):
    """A proposal is malformed, duplicated, or could not apply to the current rules and params."""


class VoteError(GovernanceError):
    """A vote is malformed, duplicated, late, or for a proposal that is not open."""


class SignatureError(GovernanceError):
    """A proposal or vote signature did not verify against its signer's key."""


class NotEligibleError(GovernanceError):
    """The signer may not propose or vote: never admitted, or without the reputation it takes."""


# ---------------------------------------------------------------------------------------------------
# Canonical bytes: one encoding for hashing and signing, the same in CPython and Pyodide.


def canonical_json(obj: Any) -> bytes:
    """shared.identity's canonical JSON (the one encoding every peer hashes and signs), with a typed error."""
    try:
        return identity.canonical_json(obj)
    except (TypeError, ValueError) as exc:
        raise GovernanceError(f"not canonical JSON (NaN, Infinity or a non-JSON type?): {exc}") from exc


def signing_bytes(purpose: str, obj: Any) -> bytes:
    """The bytes a node signs (ed25519, outside shared/): b"swarmgrad/v1/<purpose>\n" + canonical JSON.

    The purpose prefix ("proposal", "vote", "receipt") keeps a signature for one from being replayed as another.
    """
    canonical_json(obj)  # raise GovernanceError, not a bare ValueError, for a body that cannot be signed
    try:
        return identity.signing_bytes(purpose, obj)
    except identity.IdentityError as exc:
        raise GovernanceError(str(exc)) from exc


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def jsonable(value: Any) -> Any:
    """A copy that canonical_json accepts: non-finite floats become strings, tuples lists, Fractions "n/d"."""
    if isinstance(value, float) and not math.isfinite(value):
        return repr(value)
    if isinstance(value, Fraction):
        return fraction_str(value)
    if isinstance(value, Mapping):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    return value


def fraction_str(x: Fraction) -> str:
    return f"{x.numerator}/{x.denominator}"


def parse_fraction(value: Any, what: str) -> Fraction:
    """An exact fraction from "n/d", an int, or a Fraction. Floats are refused: 0.1 is not 1/10."""
    if isinstance(value, bool) or isinstance(value, float):
        raise GovernanceError(f"{what} must be an exact fraction like \"2/3\", got {value!r}")
    try:
        return Fraction(value)
    except (TypeError, ValueError, ZeroDivisionError) as exc:
        raise GovernanceError(f"{what} must be an exact fraction like \"2/3\", got {value!r}") from exc


def check_node_id(node_id: Any, what: str = "node id") -> str:
    if not isinstance(node_id, str) or not NODE_ID_PATTERN.match(node_id):
        raise GovernanceError(f"{what} must be 1-128 characters of [A-Za-z0-9_.:+/=-], got {node_id!r}")
    return node_id


def _check_round(value: Any, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise GovernanceError(f"{what} must be a non-negative integer round, got {value!r}")
    return value


def _check_stamp(stamp: int, current_round: int, what: str, error: type[GovernanceError]) -> None:
    """A message stamped far from the current round is refused: one stamped ahead would never expire."""
    _check_round(current_round, "current round")
    if abs(stamp - current_round) > STAMP_TOLERANCE_ROUNDS:
        raise error(f"{what} stamped round {stamp}, but the current round is {current_round}: stamp it with the "
                    f"current round (±{STAMP_TOLERANCE_ROUNDS}) and sign it again")


# ---------------------------------------------------------------------------------------------------


# ---------------------------------------------------------------------------------------------------
# The audit log: every blocking decision and every governance change, hash-chained.


@dataclass(frozen=True)
class AuditEntry:
    seq: int
    prev: str
    kind: str  # "blocked" or "change"
    round: int
    action: str
    subject: str
    rule_ids: tuple[str, ...]
    reasons: tuple[str, ...]
    detail: dict
    hash: str

    def body(self) -> dict:
        return {
            "seq": self.seq,
            "prev": self.prev,
            "kind": self.kind,
            "round": self.round,
            "action": self.action,
            "subject": self.subject,
            "rule_ids": list(self.rule_ids),
            "reasons": list(self.reasons),
            "detail": self.detail,
        }

    def compute_hash(self) -> str:
        return sha256_hex(canonical_json(self.body()))

    def to_dict(self) -> dict:
        return {**self.body(), "hash": self.hash}

    @classmethod
    def from_dict(cls, d: Mapping) -> AuditEntry:
        try:
            return cls(
                int(d["seq"]), str(d["prev"]), str(d["kind"]), int(d["round"]), str(d["action"]),
                str(d["subject"]), tuple(d["rule_ids"]), tuple(d["reasons"]), dict(d["detail"]), str(d["hash"]),
            )  # fmt: skip
        except (KeyError, TypeError, ValueError) as exc:
            raise GovernanceError(f"malformed audit entry: {exc}") from exc


class AuditLog:
    """Append-only, hash-chained. Loading never verifies, so a tampered log can still be read and reported."""

    def __init__(self, entries: Iterable[AuditEntry] = ()):
        self.entries: list[AuditEntry] = list(entries)

    @property
    def head(self) -> str:
        return self.entries[-1].hash if self.entries else GENESIS_HASH

    def _append(self, kind: str, round: int, action: str, subject: str, rule_ids, reasons, detail) -> AuditEntry:
        _check_round(round, "audit round")
        body_detail = jsonable(dict(detail or {}))
        canonical_json(body_detail)  # refuse before appending, so a bad detail never half-writes an entry
        entry = AuditEntry(len(self.entries), self.head, kind, round, action, str(subject),
                           tuple(rule_ids), tuple(reasons), body_detail, "")  # fmt: skip
        entry = dataclasses.replace(entry, hash=entry.compute_hash())
        self.entries.append(entry)
        return entry

    def append_decision(self, decision: Decision, *, round: int, subject: str, detail: Mapping | None = None):
        """Record a blocking decision: who (subject, e.g. a node id) was blocked from what, by which rules."""
        if decision.allowed:
            raise GovernanceError("only blocking decisions go to the audit log")
        return self._append("blocked", round, decision.action, subject, decision.blocked_by, decision.reasons,
                            {"slash": decision.slash, **(detail or {})})  # fmt: skip

    def append_change(self, change: Change) -> AuditEntry:
        detail = {"proposal_id": change.proposal_id, "before": change.before, "after": change.after}
        return self._append("change", change.round, change.kind, change.target, (), (), detail)

    def verify(self) -> int | None:
        """Index of the first entry whose sequence, link or hash is wrong; None when the chain is intact."""
        prev = GENESIS_HASH
        for i, e in enumerate(self.entries):
            try:
                good = e.seq == i and e.prev == prev and e.compute_hash() == e.hash
            except GovernanceError:
                good = False
            if not good:
                return i
            prev = e.hash
        return None

    def to_list(self) -> list[dict]:
        return [e.to_dict() for e in self.entries]

    @classmethod
    def from_list(cls, items: Iterable[Mapping]) -> AuditLog:
        return cls(AuditEntry.from_dict(d) for d in items)


# ---------------------------------------------------------------------------------------------------
# Proposals and votes.


@dataclass(frozen=True)
class Proposal:
    """A signed request to change the rules or a job parameter.

    kind and payload:
      add_rule     {"rule": {...}}                  a rule whose id is new
      change_rule  {"rule": {...}}                  replaces the rule with the same id
      remove_rule  {"rule_id": "..."}
      set_param    {"name": "lr", "value": 0.001}   an existing job parameter, same type
    round is the round during which it was made; it can take effect at round + 1 at the earliest.
    """

    proposer: str
    kind: str
    payload: dict
    round: int
    note: str = ""
    signature: str = ""  # hex or base64 of the signer's ed25519 signature over signing_bytes(); not hashed

    def body(self) -> dict:
        return {"proposer": self.proposer, "kind": self.kind, "payload": self.payload, "round": self.round,
                "note": self.note}  # fmt: skip

    def signing_bytes(self) -> bytes:
        return signing_bytes("proposal", self.body())

    @property
    def id(self) -> str:
        """Content address: two different proposals never share an id, and nobody can pick one."""
        return sha256_hex(self.signing_bytes())

    def check(self) -> None:
        check_node_id(self.proposer, "proposer")
        _check_round(self.round, "proposal round")
        if not isinstance(self.note, str) or len(self.note) > MAX_REASON_CHARS:
            raise ProposalError(f"note must be a string of at most {MAX_REASON_CHARS} characters")
        if not isinstance(self.signature, str):
            raise ProposalError("signature must be a string")
        p = self.payload
        if self.kind not in PROPOSAL_KINDS:
            raise ProposalError(f"proposal kind must be one of {PROPOSAL_KINDS}, got {self.kind!r}")
        if not isinstance(p, Mapping):
            raise ProposalError("proposal payload must be an object")
        expected = {"add_rule": {"rule"}, "change_rule": {"rule"}, "remove_rule": {"rule_id"},
                    "set_param": {"name", "value"}}[self.kind]  # fmt: skip
        if set(p) != expected:
            raise ProposalError(f"{self.kind} payload needs exactly {sorted(expected)}, got {sorted(p)}")
        if "rule" in p:
            Rule.from_dict(p["rule"])
        canonical_json(self.body())

    def to_dict(self) -> dict:
        return {**self.body(), "signature": self.signature, "id": self.id}

    @classmethod
    def from_dict(cls, d: Mapping) -> Proposal:
        try:
            p = cls(d["proposer"], d["kind"], copy.deepcopy(d["payload"]), d["round"], d.get("note", ""),
                    d.get("signature", ""))  # fmt: skip
        except (KeyError, TypeError) as exc:
            raise ProposalError(f"malformed proposal: {exc}") from exc
        p.check()
        if "id" in d and d["id"] != p.id:
            raise ProposalError(f"proposal id {d['id']!r} does not match its content ({p.id})")
        return p


@dataclass(frozen=True)
class Vote:
    proposal_id: str
    voter: str
    approve: bool
    round: int
    signature: str = ""

    def body(self) -> dict:
        return {"proposal_id": self.proposal_id, "voter": self.voter, "approve": self.approve, "round": self.round}

    def signing_bytes(self) -> bytes:
        return signing_bytes("vote", self.body())

    def check(self) -> None:
        check_node_id(self.voter, "voter")
        _check_round(self.round, "vote round")
        if not isinstance(self.proposal_id, str) or not re.fullmatch(r"[0-9a-f]{64}", self.proposal_id):
            raise VoteError(f"proposal_id must be 64 lowercase hex digits, got {self.proposal_id!r}")
        if not isinstance(self.approve, bool):
            raise VoteError(f"approve must be true or false, got {self.approve!r}")
        if not isinstance(self.signature, str):
            raise VoteError("signature must be a string")

    def to_dict(self) -> dict:
        return {**self.body(), "signature": self.signature}

    @classmethod
    def from_dict(cls, d: Mapping) -> Vote:
        try:
            v = cls(d["proposal_id"], d["voter"], d["approve"], d["round"], d.get("signature", ""))
        except (KeyError, TypeError) as exc:
            raise VoteError(f"malformed vote: {exc}") from exc
        v.check()
        return v


@dataclass(frozen=True)
class Tally:
    """A proposal's standing. Weights are reputations (negative counts as zero), summed exactly."""

    proposal_id: str
    total_weight: int
    voted_weight: int
    yes_weight: int
    quorum: Fraction
    threshold: Fraction

    @property
    def quorum_met(self) -> bool:
        # voted / total >= quorum, cross-multiplied so that no rounding can differ between peers
        return self.total_weight > 0 and self.voted_weight * self.quorum.denominator >= (
            self.quorum.numerator * self.total_weight
        )

    @property
    def threshold_met(self) -> bool:
        # yes / voted >= threshold: exactly at the threshold passes
        return self.voted_weight > 0 and self.yes_weight * self.threshold.denominator >= (
            self.threshold.numerator * self.voted_weight
        )

    @property
    def passed(self) -> bool:
        return self.quorum_met and self.threshold_met

    def to_dict(self) -> dict:
        return {"proposal_id": self.proposal_id, "total_weight": self.total_weight,
                "voted_weight": self.voted_weight, "yes_weight": self.yes_weight,
                "quorum": fraction_str(self.quorum), "threshold": fraction_str(self.threshold),
                "quorum_met": self.quorum_met, "threshold_met": self.threshold_met, "passed": self.passed}  # fmt: skip


def tally(proposal_id: str, votes: Iterable[Vote], reputation: Mapping[str, int], quorum: Fraction,
          threshold: Fraction) -> Tally:  # fmt: skip
    """Weigh votes by reputation. total_weight is all positive reputation in the network, voters or not."""
    weight = {node: max(0, int(r)) for node, r in reputation.items()}
    voted = yes = 0
    for v in votes:
        w = weight.get(v.voter, 0)
        voted += w
        yes += w if v.approve else 0
    return Tally(proposal_id, sum(weight.values()), voted, yes, quorum, threshold)


@dataclass
class ProposalState:
    """A proposal with its votes and outcome; the record the coordinator persists."""

    proposal: Proposal
    status: str = "open"
    votes: dict[str, Vote] = field(default_factory=dict)
    decided_round: int | None = None
    outcome: str = ""

    def to_dict(self) -> dict:
        return {"proposal": self.proposal.to_dict(), "status": self.status,
                "votes": [self.votes[k].to_dict() for k in sorted(self.votes)],
                "decided_round": self.decided_round, "outcome": self.outcome}  # fmt: skip

    @classmethod
    def from_dict(cls, d: Mapping) -> ProposalState:
        if d.get("status") not in PROPOSAL_STATES:
            raise GovernanceError(f"proposal status must be one of {PROPOSAL_STATES}, got {d.get('status')!r}")
        votes = [Vote.from_dict(v) for v in d.get("votes", [])]
        return cls(Proposal.from_dict(d["proposal"]), d["status"], {v.voter: v for v in votes},
                   d.get("decided_round"), d.get("outcome", ""))  # fmt: skip


@dataclass(frozen=True)
class Change:
    """One change that took effect at a round boundary."""

    proposal_id: str
    kind: str
    target: str  # rule id or param name
    before: Any
    after: Any
    round: int

    def to_dict(self) -> dict:
        return {"proposal_id": self.proposal_id, "kind": self.kind, "target": self.target,
                "before": self.before, "after": self.after, "round": self.round}  # fmt: skip

    @classmethod
    def from_dict(cls, d: Mapping) -> Change:
        return cls(d["proposal_id"], d["kind"], d["target"], d["before"], d["after"], d["round"])


def _check_param_value(params: Mapping[str, Any], name: Any, value: Any) -> None:
    if not isinstance(name, str) or name not in params:
        raise ProposalError(f"set_param may only change an existing job parameter {sorted(params)}, got {name!r}")
    old = params[name]
    if isinstance(old, bool) or isinstance(value, bool):
        ok = isinstance(old, bool) and isinstance(value, bool)
    elif isinstance(old, int):
        ok = isinstance(value, int)
    elif isinstance(old, float):
        ok = is_number(value) and not isinstance(value, Fraction) and math.isfinite(value)
    else:
        ok = type(value) is type(old)
    if not ok:
        raise ProposalError(f"param {name!r} is {type(old).__name__}, cannot set it to {value!r}")


SignatureCheck = Callable[[str, bytes, str], bool]  # (signer node id, signed bytes, signature) -> valid


class Governance:
    """The rules, the job parameters, the proposals and votes, and the audit log of one job.

    The coordinator calls validate() for every admission, round config, update and storage decision,
    propose()/vote() for signed governance messages, and apply_passed() at each round boundary.
    verify_signature, when given, checks every proposal and vote; it is not persisted.
    """

    def __init__(self, rules: Rulebook, params: Mapping[str, Any], *, quorum: Fraction = Fraction(1, 2),
                 threshold: Fraction = Fraction(2, 3), voting_rounds: int = 20,
                 verify_signature: SignatureCheck | None = None):  # fmt: skip
        for name, x in (("quorum", quorum), ("threshold", threshold)):
            if not isinstance(x, Fraction) or not 0 < x <= 1:
                raise GovernanceError(f"{name} must be a Fraction in (0, 1], got {x!r}")
        if isinstance(voting_rounds, bool) or not isinstance(voting_rounds, int) or voting_rounds < 1:
            raise GovernanceError(f"voting_rounds must be a positive integer, got {voting_rounds!r}")
        for name in params:
            if not isinstance(name, str) or not PARAM_NAME.match(name):
                raise GovernanceError(f"job parameter name {name!r} is not an identifier")
        canonical_json(dict(params))
        self.rules = rules
        self.params: dict[str, Any] = copy.deepcopy(dict(params))
        self.quorum, self.threshold, self.voting_rounds = quorum, threshold, voting_rounds
        self.verify_signature = verify_signature
        self.proposals: dict[str, ProposalState] = {}
        self._votes_stamped: Counter[tuple[str, int]] = Counter()  # (voter, stamped round) -> votes
        self.audit = AuditLog()
        self.boundary = 0  # the last round whose boundary apply_passed() has processed

    # ---- loading ----

    @classmethod
    def from_toml(cls, text: str, **kwargs) -> Governance:
        try:
            doc = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise GovernanceError(f"rules file is not valid TOML: {exc}") from exc
        g = doc.get("governance", {})
        return cls(Rulebook.from_list(doc.get("rules", [])), doc.get("params", {}),
                   quorum=parse_fraction(g.get("quorum", "1/2"), "quorum"),
                   threshold=parse_fraction(g.get("threshold", "2/3"), "threshold"),
                   voting_rounds=g.get("voting_rounds", 20), **kwargs)  # fmt: skip

    @classmethod
    def default(cls, **kwargs) -> Governance:
        """The rules, params and voting settings in shared/default_rules.toml."""
        return cls.from_toml(DEFAULT_RULES_PATH.read_text(encoding="utf-8"), **kwargs)

    # ---- deciding ----

    def validate(self, action: str, params: Mapping[str, Any], *, round: int, subject: str,
                 detail: Mapping | None = None) -> Decision:  # fmt: skip
        """Decide an action under the rules in force; a blocking decision is appended to the audit log.

        subject names who or what was decided about (a node id, "round:12", "checkpoints").
        detail is a small JSON-able summary kept in the audit entry (never a whole tensor).
        """
        decision = self.rules.validate(action, params)
        if not decision.allowed:
            self.audit.append_decision(decision, round=round, subject=subject, detail=detail)
        return decision

    def round_config(self, **overrides: Any) -> dict:
        """The job parameters with overrides (e.g. the policy's deadline), checked against round_config rules."""
        config = {**self.params, **overrides}
        decision = self.rules.validate("round_config", config)
        if not decision.allowed:
            raise GovernanceError(f"round config blocked by {decision.blocked_by}: {decision.reasons}")
        return config

    # ---- proposals and votes ----

    def _verify(self, signer: str, message: bytes, signature: str, what: str) -> None:
        if self.verify_signature is not None and not self.verify_signature(signer, message, signature):
            raise SignatureError(f"{what} signature by {signer!r} does not verify")

    def _apply(self, proposal: Proposal, rules: Rulebook, params: dict, round: int) -> tuple[Rulebook, dict, Change]:
        """The rulebook and params after a proposal, without touching self. Raises ProposalError."""
        p, kind = proposal.payload, proposal.kind
        if kind in ("add_rule", "change_rule"):
            rule = Rule.from_dict(p["rule"])
            exists = rule.id in rules
            if kind == "add_rule" and exists:
                raise ProposalError(f"rule {rule.id!r} already exists; propose change_rule instead")
            if kind == "change_rule" and not exists:
                raise ProposalError(f"rule {rule.id!r} does not exist; propose add_rule instead")
            before = rules.get(rule.id).to_dict() if exists else None
            new_rules = rules.replace(rule)
            change = Change(proposal.id, kind, rule.id, before, rule.to_dict(), round)
        elif kind == "remove_rule":
            rule_id = p["rule_id"]
            if not isinstance(rule_id, str) or rule_id not in rules:
                raise ProposalError(f"cannot remove rule {rule_id!r}: no such rule")
            new_rules = rules.without(rule_id)
            change = Change(proposal.id, kind, rule_id, rules.get(rule_id).to_dict(), None, round)
        else:
            name, value = p["name"], p["value"]
            _check_param_value(params, name, value)
            change = Change(proposal.id, kind, name, params[name], value, round)
            new_rules, params = rules, {**params, name: value}
        # A change must leave the job runnable: the current params must pass the round_config rules.
        try:
            decision = new_rules.validate("round_config", params)
        except ConditionError as exc:
            raise ProposalError(f"after this change the round config cannot be checked: {exc}") from exc
        if not decision.allowed:
            raise ProposalError(f"after this change the round config breaks {decision.blocked_by}")
        return new_rules, params, change

    def propose(self, proposal: Proposal, *, current_round: int,
                persist: Callable[[ProposalState], None] | None = None) -> ProposalState:  # fmt: skip
        """Open a signed proposal stamped with `current_round` (±STAMP_TOLERANCE_ROUNDS). It must apply cleanly
        to the current rules and params now, and its proposer may have at most MAX_OPEN_PROPOSALS_PER_NODE open.

        persist, when given, stores the accepted proposal before it joins the open set; if it raises, nothing
        changed. Whether the proposer may propose at all (admitted, reputation) is the caller's decision.
        """
        proposal.check()
        _check_stamp(proposal.round, current_round, "proposal", ProposalError)
        if proposal.round < self.boundary:
            raise ProposalError(f"proposal is stamped round {proposal.round}, before boundary {self.boundary}")
        if proposal.id in self.proposals:
            raise ProposalError(f"proposal {proposal.id} already exists")
        open_states = [s for s in self.proposals.values() if s.status == "open"]
        if len(open_states) >= MAX_OPEN_PROPOSALS:
            raise ProposalError(f"{MAX_OPEN_PROPOSALS} proposals are open; wait for some to close")
        if sum(s.proposal.proposer == proposal.proposer for s in open_states) >= MAX_OPEN_PROPOSALS_PER_NODE:
            raise ProposalError(f"{proposal.proposer!r} already has {MAX_OPEN_PROPOSALS_PER_NODE} open proposals; "
                                f"wait for one to be decided")
        self._verify(proposal.proposer, proposal.signing_bytes(), proposal.signature, "proposal")
        # Keep a private copy: a caller mutating its payload later must not change what was signed.
        proposal = dataclasses.replace(proposal, payload=copy.deepcopy(proposal.payload))
        self._apply(proposal, self.rules, self.params, proposal.round + 1)
        state = ProposalState(proposal)
        if persist is not None:
            persist(state)
        self.proposals[proposal.id] = state
        return state

    def vote(self, vote: Vote, *, current_round: int, persist: Callable[[Vote], None] | None = None) -> None:
        """Record a signed vote stamped with `current_round` (±STAMP_TOLERANCE_ROUNDS). One vote per node per
        proposal, which cannot be changed, and at most MAX_VOTES_PER_NODE_PER_ROUND stamped with one round.

        persist, when given, stores the vote before it counts; if it raises, nothing changed. Whether the voter
        may vote at all (admitted, reputation) is the caller's decision.
        """
        vote.check()
        _check_stamp(vote.round, current_round, "vote", VoteError)
        state = self.proposals.get(vote.proposal_id)
        if state is None:
            raise VoteError(f"no proposal {vote.proposal_id}")
        if state.status != "open":
            raise VoteError(f"proposal {vote.proposal_id} is {state.status}, not open")
        if vote.round < state.proposal.round or vote.round < self.boundary:
            raise VoteError(f"vote stamped round {vote.round} predates the proposal or the last boundary")
        if vote.voter in state.votes:
            raise VoteError(f"{vote.voter!r} already voted on {vote.proposal_id}")
        if self._votes_stamped[(vote.voter, vote.round)] >= MAX_VOTES_PER_NODE_PER_ROUND:
            raise VoteError(f"{vote.voter!r} already cast {MAX_VOTES_PER_NODE_PER_ROUND} votes in round "
                            f"{vote.round}; vote again in a later round")
        self._verify(vote.voter, vote.signing_bytes(), vote.signature, "vote")
        if persist is not None:
            persist(vote)
        state.votes[vote.voter] = vote
        self._votes_stamped[(vote.voter, vote.round)] += 1

    def restore_proposals(self, states: Iterable[ProposalState]) -> None:
        """Replace the proposals and their votes with stored ones (when a coordinator starts)."""
        self.proposals = {s.proposal.id: s for s in states}
        self._votes_stamped = Counter((v.voter, v.round) for s in self.proposals.values() for v in s.votes.values())

    def tally(self, proposal_id: str, reputation: Mapping[str, int], before_round: int | None = None) -> Tally:
        """The proposal's standing now, or counting only votes cast before `before_round`."""
        state = self.proposals.get(proposal_id)
        if state is None:
            raise GovernanceError(f"no proposal {proposal_id}")
        votes = [v for v in state.votes.values() if before_round is None or v.round < before_round]
        return tally(proposal_id, votes, reputation, self.quorum, self.threshold)

    def open_proposals(self) -> list[ProposalState]:
        return sorted((s for s in self.proposals.values() if s.status == "open"),
                      key=lambda s: (s.proposal.round, s.proposal.id))  # fmt: skip

    def apply_passed(self, round: int, reputation: Mapping[str, int]) -> list[Change]:
        """At the boundary that opens `round`: apply every proposal that passed, expire the stale ones.

        Only proposals made and votes cast before `round` count, so nothing takes effect mid-round.
        Proposals apply in (round made, id) order; one that no longer applies is marked failed. Returns the
        changes, each also written to the audit log. The coordinator calls this once per boundary, with the
        reputation snapshot it persists in the same transaction.
        """
        _check_round(round, "boundary round")
        if round <= self.boundary:
            raise GovernanceError(f"boundary {round} already processed (last was {self.boundary})")
        rules, params = self.rules, dict(self.params)
        changes: list[Change] = []
        outcomes: list[tuple[ProposalState, str, str]] = []
        for state in self.open_proposals():
            if state.proposal.round > round + self.voting_rounds:
                # stamped far ahead (only data stored before stamps were checked): it would never expire
                outcomes.append((state, "expired", f"stamped round {state.proposal.round}, more than "
                                                   f"{self.voting_rounds} rounds ahead of boundary {round}"))
                continue
            if state.proposal.round >= round:
                continue
            t = self.tally(state.proposal.id, reputation, before_round=round)
            if t.passed:
                try:
                    rules, params, change = self._apply(state.proposal, rules, params, round)
                except GovernanceError as exc:
                    outcomes.append((state, "failed", str(exc)))
                    continue
                changes.append(change)
                outcomes.append((state, "applied", f"passed with {t.yes_weight}/{t.voted_weight} of {t.total_weight}"))
            elif round > state.proposal.round + self.voting_rounds:
                # quorum reached but not the threshold: the network said no; otherwise it did not say
                status = "rejected" if t.quorum_met else "expired"
                outcomes.append((state, status, f"not passed within {self.voting_rounds} rounds: "
                                                f"{t.yes_weight}/{t.voted_weight} yes of {t.total_weight}"))
        # Everything above was computed on copies; commit only now, so an error leaves state as it was.
        self.rules, self.params, self.boundary = rules, params, round
        for state, status, outcome in outcomes:
            state.status, state.decided_round, state.outcome = status, round, outcome
        for change in changes:
            self.audit.append_change(change)
        return changes

    # ---- persistence ----

    def to_dict(self, *, with_proposals: bool = True) -> dict:
        """Everything, as JSON. with_proposals=False leaves out proposals and votes, for a store that keeps them
        elsewhere (the coordinator keeps one row per proposal and per vote)."""
        d = {
            "rules": self.rules.to_list(),
            "params": copy.deepcopy(self.params),
            "quorum": fraction_str(self.quorum),
            "threshold": fraction_str(self.threshold),
            "voting_rounds": self.voting_rounds,
            "boundary": self.boundary,
            "audit": self.audit.to_list(),
        }
        if with_proposals:
            d["proposals"] = [self.proposals[k].to_dict() for k in sorted(self.proposals)]
        return d

    @classmethod
    def from_dict(cls, d: Mapping, **kwargs) -> Governance:
        g = cls(Rulebook.from_list(d["rules"]), d["params"], quorum=parse_fraction(d["quorum"], "quorum"),
                threshold=parse_fraction(d["threshold"], "threshold"), voting_rounds=d["voting_rounds"],
                **kwargs)  # fmt: skip
        g.boundary = _check_round(d.get("boundary", 0), "boundary")
        g.restore_proposals(ProposalState.from_dict(s) for s in d.get("proposals", []))
        g.audit = AuditLog.from_list(d.get("audit", []))
        return g
