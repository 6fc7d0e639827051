"""The GLAN taxonomy (step 1): fields > sub-fields > disciplines, loaded from YAML into frozen objects.

Ids. A node's id is its `id:` when the YAML gives one, else "<parent id>.<slug of its name>" (a
field's is the slug alone), e.g. `academic-natural-science.physical-sciences.physics`. Slugs are
ASCII lower case with runs of other characters turned into "-"; a name with no ASCII letters or
digits gets "n" + the first 10 hex digits of its name's SHA-256. So ids are readable in SQL, the same
on every run and machine, and adding a node never changes another node's id. Renaming or moving a
node changes its id (and so, downstream, makes it a new discipline) unless the old id is pinned
with `id:`; children of a node with a pinned id derive from the pinned id.

Review workflow (the paper's "humans review each node keep/remove by majority vote"):
`propose_taxonomy` asks the LLM for candidate trees under several instructions and merges them;
`review_candidates` adds the current taxonomy's nodes; `write_review_file` writes one YAML file per
reviewer with `decision: keep` on every node; `apply_reviews` counts the votes and returns the new
taxonomy, which `dump_taxonomy` writes back. Vote rule: a change needs a strict majority of the
review files that list the node; a tie (or no vote) keeps the status quo, so a node already in the
taxonomy stays and a new candidate is not added. Removing a node removes its descendants; a field or
sub-field left with no children is dropped too, since it would have nothing to expand.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import re
import unicodedata
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace
from importlib import resources
from pathlib import Path
from typing import Any, NamedTuple

import jinja2
import yaml

from jobs.config.files import find_conf_file
from jobs.errors import InputError
from udfs.config_checks import SettingError, at_least

PROPOSE_PROMPT = "taxonomy_propose"

# One key per level; a node at level i holds its children under _LEVEL_KEYS[i + 1].
_LEVEL_KEYS = ("fields", "sub_fields", "disciplines")
_LEVEL_NAMES = ("field", "sub-field", "discipline")
_NODE_KEYS = frozenset({"name", "id", "description"})
_REVIEW_KEYS = frozenset({"decision", "in_taxonomy", "proposed_by"})
DECISIONS = ("keep", "remove")

_ID_RE = re.compile(r"^[a-z0-9]+(?:[-_][a-z0-9]+)*(?:\.[a-z0-9]+(?:[-_][a-z0-9]+)*)*$")
MAX_ID_LENGTH = 200
MAX_NAME_LENGTH = 200

# Limits of one proposal; the JSON schema gives every array a maxItems so that grammar-constrained
# decoding (llama.cpp) terminates and a runaway answer cannot blow up the review file.
MAX_PROPOSED_FIELDS = 12
MAX_PROPOSED_SUB_FIELDS = 12
MAX_PROPOSED_DISCIPLINES = 20
_NAMED_NODE = {"name": {"type": "string", "minLength": 1, "maxLength": MAX_NAME_LENGTH},
               "description": {"type": "string", "maxLength": 300}}
PROPOSE_SCHEMA: dict[str, Any] = {
    "type": "object",
    "additionalProperties": False,
    "required": ["fields"],
    "properties": {"fields": {
        "type": "array", "minItems": 1, "maxItems": MAX_PROPOSED_FIELDS,
        "items": {
            "type": "object", "additionalProperties": False,
            "required": ["name", "description", "sub_fields"],
            "properties": {**_NAMED_NODE, "sub_fields": {
                "type": "array", "minItems": 1, "maxItems": MAX_PROPOSED_SUB_FIELDS,
                "items": {
                    "type": "object", "additionalProperties": False,
                    "required": ["name", "description", "disciplines"],
                    "properties": {**_NAMED_NODE, "disciplines": {
                        "type": "array", "minItems": 1, "maxItems": MAX_PROPOSED_DISCIPLINES,
                        "items": {
                            "type": "object", "additionalProperties": False,
                            "required": ["name", "description"],
                            "properties": dict(_NAMED_NODE),
                        },
                    }},
                },
            }},
        },
    }},
}


# ---------------------------------------------------------------------------------------------
# Config


@dataclass(frozen=True)
class TaxonomyConfig:
    """Where the taxonomy is, which disciplines a run covers, and how `glan taxonomy propose` asks."""

    file: str = "taxonomy.yaml"  # a path, else a file of that name in the packaged conf/
    disciplines: tuple[str, ...] = ()  # names or ids to restrict the run to; empty: all
    # Several differently worded requests, as in the paper; the texts live in conf/base.yaml.
    propose_instructions: tuple[str, ...] = ()
    proposals_per_instruction: int = 1

    def __post_init__(self) -> None:
        if not self.file or not self.file.strip():
            raise SettingError("file", "file= must not be empty")
        for name in ("disciplines", "propose_instructions"):
            for i, text in enumerate(getattr(self, name)):
                if not text or not text.strip():
                    raise SettingError(name, f"{name}[{i}] must not be empty")
        at_least(self, 1, "proposals_per_instruction")

    def path(self) -> Path:
        return find_conf_file(self.file)


# ---------------------------------------------------------------------------------------------
# The taxonomy


@dataclass(frozen=True)
class Node:
    """One field, sub-field or discipline. `id_given`: the id came from the YAML (dump keeps it)."""

    name: str
    id: str
    description: str | None = None
    children: tuple[Node, ...] = ()
    id_given: bool = False


class DisciplineRow(NamedTuple):
    """One leaf with its ancestors: a row of the `taxonomy` table."""

    field_id: str
    field: str
    sub_field_id: str
    sub_field: str
    discipline_id: str
    discipline: str
    description: str | None


@dataclass(frozen=True)
class Taxonomy:
    """The validated tree; `source` (the file it came from) prefixes error messages."""

    fields: tuple[Node, ...]
    source: str = "<memory>"

    def disciplines(self) -> list[DisciplineRow]:
        """Every leaf in file order."""
        return [
            DisciplineRow(f.id, f.name, s.id, s.name, d.id, d.name, d.description)
            for f in self.fields for s in f.children for d in s.children
        ]

    def select(self, names: Iterable[str]) -> Taxonomy:
        """Only the disciplines named (by name, case-insensitively, or by id), with their ancestors.
        No names: the whole taxonomy. An unknown name is an `InputError` that lists all unknowns."""
        wanted = [n.strip() for n in names if n and n.strip()]
        if not wanted:
            return self
        rows = self.disciplines()
        by_key: dict[str, set[str]] = {}
        for row in rows:
            by_key.setdefault(_name_key(row.discipline), set()).add(row.discipline_id)
            by_key.setdefault(row.discipline_id, set()).add(row.discipline_id)
        unknown = [n for n in wanted if _name_key(n) not in by_key and n not in by_key]
        if unknown:
            choices = sorted({row.discipline for row in rows})
            parts = []
            for name in unknown:
                close = difflib.get_close_matches(name, choices, n=1)
                parts.append(f"{name!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
            raise InputError(f"{self.source}: unknown discipline(s): {', '.join(parts)}")
        keep = set().union(*(by_key.get(_name_key(n)) or by_key[n] for n in wanted))
        fields = []
        for f in self.fields:
            subs = []
            for s in f.children:
                leaves = tuple(d for d in s.children if d.id in keep)
                if leaves:
                    subs.append(replace(s, children=leaves))
            if subs:
                fields.append(replace(f, children=tuple(subs)))
        return replace(self, fields=tuple(fields))


def parse_discipline_list(text: str | None) -> tuple[str, ...]:
    """`--disciplines "Mathematics, Physics"` -> ("Mathematics", "Physics")."""
    if not text:
        return ()
    return tuple(part.strip() for part in text.split(",") if part.strip())


def load_taxonomy(path: str | Path) -> Taxonomy:
    """Read and validate a taxonomy file; any problem is an `InputError` naming the node's path."""
    source = str(path)
    # A packaged file may live inside the --py-files zip: read it through its own read_text.
    data = _read_yaml(path if hasattr(path, "read_text") else Path(path), source)
    raw = _parse_tree(data, source, review=False)
    return _build(raw, source)


def load_configured_taxonomy(cfg: TaxonomyConfig) -> Taxonomy:
    """The configured file, restricted to `cfg.disciplines`."""
    return load_taxonomy(cfg.path()).select(cfg.disciplines)


def dump_taxonomy(taxonomy: Taxonomy, path: str | Path | None = None) -> str:
    """The taxonomy as YAML that `load_taxonomy` reads back to an equal taxonomy; written to `path`
    when given. Ids are written only where they were pinned: the others derive again."""
    text = _HEADER + yaml.safe_dump(
        {"fields": [_node_dict(f, 0) for f in taxonomy.fields]},
        sort_keys=False, allow_unicode=True, width=120,
    )
    if path is not None:
        Path(path).write_text(text, encoding="utf-8")
    return text


_HEADER = (
    "# GLAN taxonomy: fields > sub-fields > disciplines. Written by glan; see conf/taxonomy.yaml\n"
    "# for the format. A node without `id` derives it from its parent's id and its own name.\n"
)


def _node_dict(node: Node, level: int) -> dict[str, Any]:
    out: dict[str, Any] = {"name": node.name}
    if node.id_given:
        out["id"] = node.id
    if node.description:
        out["description"] = node.description
    if level < 2:
        out[_LEVEL_KEYS[level + 1]] = [_node_dict(c, level + 1) for c in node.children]
    return out


# ---------------------------------------------------------------------------------------------
# Parsing and validation, shared by taxonomy files and review files


@dataclass
class _Raw:
    name: str
    path: str
    id: str | None = None
    description: str | None = None
    children: list[_Raw] = field(default_factory=list)
    decision: str | None = None  # review files only


def _read_yaml(path: Path, source: str) -> Any:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise InputError(f"{source}: cannot read ({exc.strerror or exc})") from None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise InputError(f"{source}{where}: not valid YAML ({getattr(exc, 'problem', None) or exc})") from None


def _name_key(name: str) -> str:
    return " ".join(name.split()).casefold()


def _parse_tree(data: Any, source: str, *, review: bool) -> list[_Raw]:
    if not isinstance(data, dict) or "fields" not in data:
        raise InputError(f"{source}: the top level must be a mapping with a 'fields' list")
    extra = set(data) - {"fields", "reviewer"} if review else set(data) - {"fields"}
    if extra:
        raise InputError(f"{source}: unknown top-level key(s) {', '.join(map(repr, sorted(extra)))}")
    return _parse_level(data["fields"], 0, source, "", review=review)


def _parse_level(items: Any, level: int, source: str, parent: str, *, review: bool) -> list[_Raw]:
    key = _LEVEL_KEYS[level]
    here = f"{parent} > {key}" if parent else key
    if not isinstance(items, list) or not items:
        raise InputError(f"{source}: {here}: must be a non-empty list")
    nodes: list[_Raw] = []
    seen: dict[str, str] = {}
    for i, item in enumerate(items):
        node = _parse_node(item, level, source, f"{here}[{i}]", review=review)
        dup = seen.get(_name_key(node.name))
        if dup is not None:
            raise InputError(f"{source}: {node.path}: duplicate name {node.name!r} under one parent (also {dup})")
        seen[_name_key(node.name)] = node.path
        nodes.append(node)
    return nodes


def _parse_node(item: Any, level: int, source: str, where: str, *, review: bool) -> _Raw:
    # A bare string is shorthand for a leaf with only a name.
    if isinstance(item, str) and level == 2:
        item = {"name": item}
    if not isinstance(item, dict):
        raise InputError(f"{source}: {where}: a {_LEVEL_NAMES[level]} must be a mapping with a name")
    name = item.get("name")
    if name is None or (isinstance(name, str) and not name.strip()):
        raise InputError(f"{source}: {where}: empty name")
    if not isinstance(name, str):
        raise InputError(f"{source}: {where}: name must be a string, got {type(name).__name__} {name!r}")
    name = name.strip()
    path = f'{where} "{name}"'
    if any(unicodedata.category(ch)[0] == "C" for ch in name) or len(name) > MAX_NAME_LENGTH:
        raise InputError(f"{source}: {path}: name must be one line of at most {MAX_NAME_LENGTH} characters")

    child_key = _LEVEL_KEYS[level + 1] if level < 2 else None
    allowed = _NODE_KEYS | ({child_key} if child_key else set()) | (_REVIEW_KEYS if review else set())
    for key in item:
        if key in allowed:
            continue
        if key in _LEVEL_KEYS or key == "children":
            expected = f"holds {child_key}" if child_key else "is a leaf"
            raise InputError(f"{source}: {path}: wrong depth: a {_LEVEL_NAMES[level]} {expected}, "
                             f"found {key!r} (the levels are fields > sub_fields > disciplines)")
        raise InputError(f"{source}: {path}: unknown key {key!r} (allowed: {', '.join(sorted(allowed))})")

    node_id = item.get("id")
    if node_id is not None:
        if not isinstance(node_id, str) or not _ID_RE.match(node_id) or len(node_id) > MAX_ID_LENGTH:
            raise InputError(f"{source}: {path}: malformed id {node_id!r} (lower-case letters, digits, "
                             f"'-', '_', dot-separated, at most {MAX_ID_LENGTH} characters)")
    description = item.get("description")
    if description is not None and not isinstance(description, str):
        raise InputError(f"{source}: {path}: description must be a string")
    description = " ".join(description.split()) if description else ""

    decision = None
    if review:
        decision = item.get("decision")
        if decision not in DECISIONS:
            raise InputError(f"{source}: {path}: decision must be 'keep' or 'remove', got {decision!r}")

    node = _Raw(name=name, path=path, id=node_id, description=description or None, decision=decision)
    if child_key:
        if child_key not in item:
            raise InputError(f"{source}: {path}: wrong depth: a {_LEVEL_NAMES[level]} needs {child_key} "
                             f"(the levels are fields > sub_fields > disciplines)")
        node.children = _parse_level(item[child_key], level + 1, source, path, review=review)
    return node


def slugify(name: str) -> str:
    """The id segment derived from a name (see the module docstring)."""
    text = unicodedata.normalize("NFKD", name).encode("ascii", "ignore").decode("ascii").lower()
    slug = re.sub(r"[^a-z0-9]+", "-", text.replace("&", " and ")).strip("-")
    return slug or "n" + hashlib.sha256(name.encode("utf-8")).hexdigest()[:10]


def derive_id(parent_id: str | None, name: str) -> str:
    return f"{parent_id}.{slugify(name)}" if parent_id else slugify(name)


def _build(raw: list[_Raw], source: str) -> Taxonomy:
    used: dict[str, str] = {}

    def build(node: _Raw, parent_id: str | None) -> Node:
        node_id = node.id or derive_id(parent_id, node.name)
        if node_id in used:
            hint = "" if node.id else "; give one of them an explicit id"
            raise InputError(f"{source}: {node.path}: duplicate id {node_id!r} (also {used[node_id]}){hint}")
        used[node_id] = node.path
        children = tuple(build(c, node_id) for c in node.children)
        return Node(node.name, node_id, node.description, children, id_given=node.id is not None)

    return Taxonomy(tuple(build(f, None) for f in raw), source)


# ---------------------------------------------------------------------------------------------
# Proposals


@dataclass(frozen=True)
class CandidateNode:
    """A node offered for review. `proposed_by`: how many LLM proposals named it; `in_taxonomy`: it
    is in the current taxonomy (then `id` is its pinned id, if any)."""

    name: str
    description: str | None = None
    children: tuple[CandidateNode, ...] = ()
    proposed_by: int = 0
    in_taxonomy: bool = False
    id: str | None = None


def propose_prompt_variables(instruction: str, field_names: Sequence[str] = ()) -> dict[str, Any]:
    """The variables of `prompts/taxonomy_propose.j2` for one instruction."""
    return {"instruction": instruction.strip(), "fields": list(field_names), "max_fields": MAX_PROPOSED_FIELDS,
            "max_sub_fields": MAX_PROPOSED_SUB_FIELDS, "max_disciplines": MAX_PROPOSED_DISCIPLINES}


def render_propose_prompt(instruction: str, field_names: Sequence[str] = ()) -> str:
    """The `taxonomy_propose` prompt for one instruction, as one user message."""
    text = (resources.files("prompts") / f"{PROPOSE_PROMPT}.j2").read_text(encoding="utf-8")
    # The same settings as udfs.llm.prompts, so that the real client renders the same text.
    env = jinja2.Environment(undefined=jinja2.StrictUndefined, autoescape=False)
    return env.from_string(text).render(**propose_prompt_variables(instruction, field_names)).strip()


def parse_proposal(answer: Any) -> list[CandidateNode]:
    """Candidate fields from one LLM answer, never raising: malformed nodes are dropped, and a field
    or sub-field left with no disciplines is dropped with them. Accepts the parsed JSON or its text."""
    if isinstance(answer, str):
        try:
            answer = json.loads(answer)
        except ValueError:
            return []
    if isinstance(answer, list):
        answer = {"fields": answer}
    if not isinstance(answer, dict):
        return []
    return _parse_candidates(answer.get("fields"), 0)


def _parse_candidates(items: Any, level: int) -> list[CandidateNode]:
    if not isinstance(items, list):
        return []
    out: dict[str, CandidateNode] = {}
    for item in items:
        if isinstance(item, str) and level == 2:
            item = {"name": item}
        if not isinstance(item, dict) or not isinstance(item.get("name"), str):
            continue
        name = " ".join(item["name"].split())
        if not name or len(name) > MAX_NAME_LENGTH or _name_key(name) in out:
            continue
        desc = item.get("description")
        desc = " ".join(desc.split()) if isinstance(desc, str) else ""
        children: tuple[CandidateNode, ...] = ()
        if level < 2:
            children = tuple(_parse_candidates(item.get(_LEVEL_KEYS[level + 1]), level + 1))
            if not children:
                continue
        out[_name_key(name)] = CandidateNode(name, desc or None, children, proposed_by=1)
    return list(out.values())


def merge_candidates(*trees: Iterable[CandidateNode]) -> list[CandidateNode]:
    """The union of several candidate trees by name (case-insensitively) at each level, in order of
    first appearance; `proposed_by` adds up, the first description and id win."""
    merged: dict[str, CandidateNode] = {}
    for tree in trees:
        for node in tree:
            key = _name_key(node.name)
            old = merged.get(key)
            if old is None:
                merged[key] = replace(node, children=tuple(merge_candidates(node.children)))
            else:
                merged[key] = replace(
                    old,
                    description=old.description or node.description,
                    children=tuple(merge_candidates(old.children, node.children)),
                    proposed_by=old.proposed_by + node.proposed_by,
                    in_taxonomy=old.in_taxonomy or node.in_taxonomy,
                    id=old.id or node.id,
                )
    return list(merged.values())


def propose_taxonomy(instructions: Sequence[str], call_llm: Callable[[str, str], Any], *,
                     proposals_per_instruction: int = 1,
                     field_names: Sequence[str] = ()) -> list[CandidateNode]:
    """Ask for candidate trees with every instruction (`proposals_per_instruction` times each) and
    merge them. `call_llm(prompt_text, prompt_name)` returns the parsed JSON answer (schema
    `PROPOSE_SCHEMA`); an answer that cannot be used contributes nothing. `field_names`: keep the
    proposals under these top-level fields (e.g. the paper's 8); empty: the model proposes fields.
    With several proposals per instruction the prompt is identical each time, so the client must
    sample (T > 0) and not cache."""
    if not instructions:
        raise InputError("taxonomy.propose_instructions is empty: nothing to ask the model")
    proposals = []
    for instruction in instructions:
        prompt = render_propose_prompt(instruction, field_names)
        for _ in range(proposals_per_instruction):
            proposals.append(parse_proposal(call_llm(prompt, PROPOSE_PROMPT)))
    return merge_candidates(*proposals)


def review_candidates(taxonomy: Taxonomy | None, proposed: Iterable[CandidateNode]) -> list[CandidateNode]:
    """What reviewers vote on: the current taxonomy's nodes first (marked `in_taxonomy`), then the
    proposals merged into them."""
    current = [_candidate_from(n) for n in taxonomy.fields] if taxonomy is not None else []
    return merge_candidates(current, proposed)


def _candidate_from(node: Node) -> CandidateNode:
    return CandidateNode(node.name, node.description, tuple(_candidate_from(c) for c in node.children),
                         in_taxonomy=True, id=node.id if node.id_given else None)


_REVIEW_HEADER = """\
# GLAN taxonomy review. For every node set `decision: keep` or `decision: remove`.
# Removing a field or sub-field removes everything under it. Do not rename nodes here: a node is
# identified by its names path, so a renamed node counts as a different one (rename in the
# taxonomy file instead). in_taxonomy: already in the taxonomy; proposed_by: how many model
# proposals named it. `glan taxonomy apply` takes a majority vote over all reviewers' files; a tie
# keeps what the taxonomy already has and does not add new nodes.
"""


def write_review_file(candidates: Iterable[CandidateNode], path: str | Path, *, reviewer: str = "") -> None:
    """One reviewer's file: every node with `decision: keep`, to be edited by hand."""
    data = {"reviewer": reviewer, "fields": [_review_dict(c, 0) for c in candidates]}
    Path(path).write_text(_REVIEW_HEADER + yaml.safe_dump(data, sort_keys=False, allow_unicode=True, width=120),
                          encoding="utf-8")


def _review_dict(node: CandidateNode, level: int) -> dict[str, Any]:
    out: dict[str, Any] = {"name": node.name, "decision": "keep"}
    if node.id:
        out["id"] = node.id
    if node.description:
        out["description"] = node.description
    out["in_taxonomy"] = node.in_taxonomy
    out["proposed_by"] = node.proposed_by
    if level < 2:
        out[_LEVEL_KEYS[level + 1]] = [_review_dict(c, level + 1) for c in node.children]
    return out


# ---------------------------------------------------------------------------------------------
# Applying reviews


@dataclass
class _Tally:
    name: str
    description: str | None
    id: str | None
    in_taxonomy: bool
    keep: int = 0
    remove: int = 0
    children: dict[str, _Tally] = field(default_factory=dict)

    def kept(self) -> bool:
        if self.keep != self.remove:
            return self.keep > self.remove
        return self.in_taxonomy  # a tie keeps the status quo


def apply_reviews(taxonomy: Taxonomy, review_paths: Sequence[str | Path]) -> Taxonomy:
    """The taxonomy after a majority vote over the review files (rule in the module docstring)."""
    if not review_paths:
        raise InputError("no review files given")
    root: dict[str, _Tally] = {}
    for f in taxonomy.fields:
        _tally_existing(root, f)
    for review_path in review_paths:
        source = str(review_path)
        for node in _parse_tree(_read_yaml(Path(review_path), source), source, review=True):
            _tally_vote(root, node)
    raw = [r for r in (_decide(t, f"fields[{i}]", 0) for i, t in enumerate(root.values())) if r]
    if not raw:
        raise InputError(f"{', '.join(map(str, review_paths))}: the reviews remove every discipline")
    return _build(raw, f"reviews of {taxonomy.source}")


def _tally_existing(into: dict[str, _Tally], node: Node) -> None:
    tally = _Tally(node.name, node.description, node.id if node.id_given else None, in_taxonomy=True)
    into[_name_key(node.name)] = tally
    for child in node.children:
        _tally_existing(tally.children, child)


def _tally_vote(into: dict[str, _Tally], node: _Raw) -> None:
    key = _name_key(node.name)
    tally = into.get(key)
    if tally is None:
        tally = into[key] = _Tally(node.name, node.description, node.id, in_taxonomy=False)
    if node.decision == "keep":
        tally.keep += 1
    else:
        tally.remove += 1
    for child in node.children:
        _tally_vote(tally.children, child)


def _decide(tally: _Tally, path: str, level: int) -> _Raw | None:
    if not tally.kept():
        return None
    raw = _Raw(tally.name, f'{path} "{tally.name}"', tally.id, tally.description)
    if level < 2:
        key = _LEVEL_KEYS[level + 1]
        kids = (_decide(t, f"{raw.path} > {key}[{i}]", level + 1) for i, t in enumerate(tally.children.values()))
        raw.children = [k for k in kids if k]
        if not raw.children:
            return None
    return raw
