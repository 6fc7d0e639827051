"""Taxonomy: the shipped file, validation errors with node paths, stable ids, proposals and reviews."""

from __future__ import annotations

import re
import textwrap
from pathlib import Path

import pytest
import yaml

from jobs.config.loader import load_config
from jobs.errors import ConfigError, InputError
from jobs.glan.taxonomy import (
    PROPOSE_SCHEMA,
    CandidateNode,
    Taxonomy,
    TaxonomyConfig,
    apply_reviews,
    dump_taxonomy,
    load_configured_taxonomy,
    load_taxonomy,
    merge_candidates,
    parse_discipline_list,
    parse_proposal,
    propose_prompt_variables,
    propose_taxonomy,
    render_propose_prompt,
    review_candidates,
    slugify,
    write_review_file,
)
from tests.support import REPO, SHARED

SHIPPED = REPO / "conf" / "taxonomy.yaml"
PAPER_FIELDS = [
    "Academic-Humanities", "Academic-Social Science", "Academic-Natural Science", "Academic-Applied Science",
    "Academic-Formal Science", "Industry-Manufacturing", "Industry-Services", "Industry-Agriculture",
]


def paper_disciplines() -> list[str]:
    """The names listed under "Disciplines named in the paper" in GLAN.md."""
    path = SHARED / "GLAN.md"
    if not path.is_file():
        pytest.skip(f"{path} not present")
    text = path.read_text()
    section = text.split("## Disciplines named in the paper", 1)[1].split("\n## ", 1)[0]
    listing = section.split("under the 8 fields above:", 1)[1]
    names = [n.strip().rstrip(".") for n in " ".join(listing.split()).split(",")]
    return [n for n in names if n]


# --- the shipped taxonomy --------------------------------------------------------------------


@pytest.fixture(scope="module")
def shipped() -> Taxonomy:
    return load_taxonomy(SHIPPED)


def test_shipped_taxonomy_has_the_papers_eight_fields(shipped):
    assert [f.name for f in shipped.fields] == PAPER_FIELDS


def test_shipped_taxonomy_has_about_126_disciplines(shipped):
    rows = shipped.disciplines()
    assert 120 <= len(rows) <= 135
    assert len({r.discipline_id for r in rows}) == len(rows)
    assert len({r.discipline.casefold() for r in rows}) == len(rows)  # a name filter is never ambiguous
    assert all(r.description for r in rows)


def test_shipped_taxonomy_contains_every_discipline_named_in_the_paper(shipped):
    named = paper_disciplines()
    assert len(named) > 60  # the parse found the list
    have = {r.discipline.casefold() for r in shipped.disciplines()}
    assert [n for n in named if n.casefold() not in have] == []


def test_configured_taxonomy_is_the_packaged_file():
    cfg = load_config()
    assert cfg.taxonomy.file == "taxonomy.yaml"
    assert len(cfg.taxonomy.propose_instructions) >= 3
    assert load_configured_taxonomy(cfg.taxonomy).disciplines() == load_taxonomy(SHIPPED).disciplines()


def test_discipline_ids_are_slugs_of_the_path(shipped):
    physics = next(r for r in shipped.disciplines() if r.discipline == "Physics")
    assert physics.field_id == "academic-natural-science"
    assert physics.sub_field_id == "academic-natural-science.physical-sciences"
    assert physics.discipline_id == "academic-natural-science.physical-sciences.physics"


@pytest.mark.parametrize("name, slug", [
    ("Materials Science and Engineering", "materials-science-and-engineering"),
    ("Arts & Crafts", "arts-and-crafts"),
    ("Économie  politique", "economie-politique"),
    ("C++", "c"),
])
def test_slugify(name, slug):
    assert slugify(name) == slug


def test_a_name_without_ascii_letters_gets_a_hash_slug():
    assert re.fullmatch(r"n[0-9a-f]{10}", slugify("数学"))
    assert slugify("数学") == slugify("数学") != slugify("物理")


# --- validation ------------------------------------------------------------------------------

TREE = """\
fields:
  - name: F
    sub_fields:
      - name: S
        disciplines:
{leaves}
"""


def tree(*leaves: str) -> str:
    return TREE.format(leaves="\n".join(f"          - {leaf}" for leaf in leaves))


BAD = {
    "empty discipline name": (tree("{name: Physics}", '{name: ""}'),
                              'fields[0] "F" > sub_fields[0] "S" > disciplines[1]: empty name'),
    "missing name": (tree("{description: x}"), 'fields[0] "F" > sub_fields[0] "S" > disciplines[0]: empty name'),
    "name not a string": (tree("{name: [a]}"), "disciplines[0]: name must be a string"),
    "duplicate name, other case": (tree("{name: Physics}", "{name: ' physics'}"),
                                   'fields[0] "F" > sub_fields[0] "S" > disciplines[1] "physics": duplicate name'),
    "discipline with children": (tree("{name: Physics, disciplines: [{name: Optics}]}"),
                                 'fields[0] "F" > sub_fields[0] "S" > disciplines[0] "Physics": wrong depth'),
    "field holding disciplines": ("fields:\n  - name: F\n    disciplines: [{name: Physics}]\n",
                                  'fields[0] "F": wrong depth'),
    "sub-field without disciplines": ("fields:\n  - name: F\n    sub_fields:\n      - name: S\n",
                                      'fields[0] "F" > sub_fields[0] "S": wrong depth'),
    "sub-field with sub_fields": ("fields:\n  - name: F\n    sub_fields:\n      - name: S\n"
                                  "        sub_fields: [{name: T, disciplines: [x]}]\n",
                                  'fields[0] "F" > sub_fields[0] "S": wrong depth'),
    "empty disciplines": ("fields:\n  - name: F\n    sub_fields:\n      - {name: S, disciplines: []}\n",
                          'fields[0] "F" > sub_fields[0] "S" > disciplines: must be a non-empty list'),
    "malformed id": (tree("{name: Physics, id: Bad Id}"),
                     'fields[0] "F" > sub_fields[0] "S" > disciplines[0] "Physics": malformed id'),
    "id not a string": (tree("{name: Physics, id: 12}"), 'disciplines[0] "Physics": malformed id'),
    "duplicate explicit id": (tree("{name: Physics, id: p}", "{name: Chemistry, id: p}"),
                              'disciplines[1] "Chemistry": duplicate id \'p\' (also fields[0] "F" > '
                              'sub_fields[0] "S" > disciplines[0] "Physics")'),
    "derived ids collide": (tree("{name: C}", "{name: C++}"),
                            "disciplines[1] \"C++\": duplicate id 'f.s.c'"),
    "unknown key": (tree("{name: Physics, descripton: x}"), "disciplines[0] \"Physics\": unknown key 'descripton'"),
    "multi-line name": (tree('{name: "Phys\\nics"}'), "disciplines[0] \"Phys\nics\": name must be one line"),
    "no fields": ("fields: []\n", "fields: must be a non-empty list"),
    "not a mapping": ("- a\n- b\n", "the top level must be a mapping"),
    "not YAML": ("fields: [\n", "not valid YAML"),
}


@pytest.mark.parametrize("snippet, expected", BAD.values(), ids=BAD.keys())
def test_validation_errors_name_the_node(tmp_path, snippet, expected):
    path = tmp_path / "taxonomy.yaml"
    path.write_text(snippet)
    with pytest.raises(InputError) as err:
        load_taxonomy(path)
    message = str(err.value)
    assert message.startswith(f"{path}: ") or message.startswith(f"{path} line ")
    assert expected in message


def test_error_message_format(tmp_path):
    data = yaml.safe_load(SHIPPED.read_text())
    data["fields"][2]["sub_fields"][2]["disciplines"].insert(3, {"name": " "})
    path = tmp_path / "taxonomy.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    with pytest.raises(InputError) as err:
        load_taxonomy(path)
    assert str(err.value) == (f'{path}: fields[2] "Academic-Natural Science" > sub_fields[2] "Life sciences" '
                              f"> disciplines[3]: empty name")


def test_missing_file_is_an_input_error(tmp_path):
    with pytest.raises(InputError, match="cannot read"):
        load_taxonomy(tmp_path / "nope.yaml")


def test_a_bare_string_is_a_discipline(tmp_path):
    path = tmp_path / "t.yaml"
    path.write_text(tree("Physics", "{name: Chemistry, description: '  Matter  and   change '}"))
    rows = load_taxonomy(path).disciplines()
    assert [(r.discipline_id, r.discipline, r.description) for r in rows] == [
        ("f.s.physics", "Physics", None), ("f.s.chemistry", "Chemistry", "Matter and change")]


# --- ids -------------------------------------------------------------------------------------


def test_ids_are_stable_when_nodes_are_added(tmp_path, shipped):
    data = yaml.safe_load(SHIPPED.read_text())
    # Insert at the front of every level so that every old node's position changes.
    data["fields"].insert(0, {"name": "Academic-Interdisciplinary", "sub_fields": [
        {"name": "Area studies", "disciplines": [{"name": "Asian studies"}]}]})
    data["fields"][3]["sub_fields"].insert(0, {"name": "Particle sciences", "disciplines": [{"name": "Optics"}]})
    data["fields"][3]["sub_fields"][1]["disciplines"].insert(0, {"name": "Astrophysics"})
    path = tmp_path / "taxonomy.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    grown = load_taxonomy(path).disciplines()
    old = {r.discipline: r for r in shipped.disciplines()}
    assert len(grown) == len(old) + 3
    assert all(old[r.discipline] == r for r in grown if r.discipline in old)
    new = {r.discipline: r.discipline_id for r in grown if r.discipline not in old}
    assert new["Astrophysics"] == "academic-natural-science.physical-sciences.astrophysics"


def test_a_pinned_id_survives_a_rename_and_its_children_follow_it(tmp_path):
    path = tmp_path / "t.yaml"
    path.write_text("fields:\n  - name: Renamed field\n    id: f\n    sub_fields:\n"
                    "      - name: S\n        disciplines: [Physics]\n")
    taxonomy = load_taxonomy(path)
    assert taxonomy.disciplines()[0].discipline_id == "f.s.physics"
    assert "id: f\n" in dump_taxonomy(taxonomy)


def test_dump_reads_back_to_the_same_taxonomy(tmp_path, shipped):
    path = tmp_path / "dumped.yaml"
    text = dump_taxonomy(shipped, path)
    assert path.read_text() == text
    assert load_taxonomy(path).fields == shipped.fields
    assert "id:" not in text  # derived ids are not written: they derive again


# --- the discipline filter -------------------------------------------------------------------


def test_select_by_name_case_insensitively_and_by_id(shipped):
    chosen = shipped.select(parse_discipline_list("mathematics, Physics,,"))
    assert [r.discipline for r in chosen.disciplines()] == ["Physics", "Mathematics"]
    assert [f.name for f in chosen.fields] == ["Academic-Natural Science", "Academic-Formal Science"]
    by_id = shipped.select(["academic-formal-science.logic-and-systems.logic"])
    assert [r.discipline for r in by_id.disciplines()] == ["Logic"]
    assert shipped.select([]) is shipped


def test_select_names_every_unknown_discipline(shipped):
    with pytest.raises(InputError) as err:
        shipped.select(["Physcs", "Mathematics", "Basket weaving"])
    assert str(err.value).endswith("unknown discipline(s): 'Physcs' (did you mean 'Physics'?), 'Basket weaving'")


def test_parse_discipline_list():
    assert parse_discipline_list(None) == ()
    assert parse_discipline_list(" Mathematics ,Physics ") == ("Mathematics", "Physics")


# --- config ----------------------------------------------------------------------------------


@pytest.mark.parametrize("kwargs, start", [
    ({"file": " "}, "file= must not be empty"),
    ({"proposals_per_instruction": 0}, "proposals_per_instruction=0 must be >= 1"),
    ({"propose_instructions": ("a", "")}, "propose_instructions[1] must not be empty"),
    ({"disciplines": ("",)}, "disciplines[0] must not be empty"),
])
def test_config_errors_start_with_the_field_name(kwargs, start):
    with pytest.raises(ValueError) as err:
        TaxonomyConfig(**kwargs)
    assert str(err.value).startswith(start)


def test_config_loader_prefixes_the_section():
    with pytest.raises(ConfigError, match=r"--set: taxonomy\.proposals_per_instruction=0 must be >= 1"):
        load_config(sets=["taxonomy.proposals_per_instruction=0"])
    cfg = load_config(sets=["taxonomy.disciplines=[Physics]"])
    assert cfg.taxonomy.disciplines == ("Physics",)
    assert [r.discipline for r in load_configured_taxonomy(cfg.taxonomy).disciplines()] == ["Physics"]


def test_config_file_is_resolved_as_a_path_first(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text(tree("Physics"))
    assert TaxonomyConfig(file=str(path)).path() == path
    assert TaxonomyConfig().path().read_text() == SHIPPED.read_text()


# --- proposals -------------------------------------------------------------------------------


def test_propose_prompt_is_rendered_exactly():
    expected = textwrap.dedent("""\
        You are helping to build a map of human knowledge and capabilities, to be used for designing a
        complete curriculum of courses.

        List all fields of human knowledge.

        Organise your answer as a three-level tree:
        - fields: broad areas of knowledge or industry;
        - sub-fields: coherent groups within a field;
        - disciplines: specific disciplines within a sub-field, each one something a student could take a
          series of courses in.

        Place everything under these fields, using their names exactly as written:
        - Academic-Humanities
        - Industry-Services

        Give at most 12 sub-fields per field and at most 20 disciplines
        per sub-field. Prefer breadth: cover every area you know of rather than listing minor variants.
        Names must be short and must not repeat under the same parent. Give every node a description of one
        sentence.

        Answer with a single JSON object and nothing else, in this form:
        {"fields": [{"name": "...", "description": "...", "sub_fields": [{"name": "...", "description": "...", "disciplines": [{"name": "...", "description": "..."}]}]}]}
        """)
    assert render_propose_prompt(" List all fields of human knowledge. ",
                                 ["Academic-Humanities", "Industry-Services"]) == expected.rstrip("\n")


@pytest.mark.parametrize("field_names", [[], ["Academic-Humanities", "Industry-Services"]])
def test_the_llm_clients_prompt_loader_renders_the_same_text(field_names):
    prompts = pytest.importorskip("udfs.llm.prompts")
    messages = prompts.load_prompt("taxonomy_propose").render(**propose_prompt_variables("Do it.", field_names))
    assert messages == [{"role": "user", "content": render_propose_prompt("Do it.", field_names)}]


def test_propose_prompt_without_fields_lets_the_model_choose():
    text = render_propose_prompt("List everything.")
    assert "Choose at most 12 fields yourself.\n\nGive at most 12 sub-fields" in text
    assert "Place everything under" not in text


def test_every_array_in_the_schema_has_max_items():
    arrays = []

    def walk(node):
        if isinstance(node, dict):
            if node.get("type") == "array":
                arrays.append(node)
            for value in node.values():
                walk(value)

    walk(PROPOSE_SCHEMA)
    assert len(arrays) == 3
    assert all(isinstance(a.get("maxItems"), int) for a in arrays)


CLEAN = {"fields": [{"name": "Science", "description": "Nature.", "sub_fields": [
    {"name": "Physical sciences", "description": "Matter.", "disciplines": [
        {"name": "Physics", "description": "Forces."}, {"name": "Chemistry", "description": "Reactions."}]}]}]}


def names(nodes) -> list:
    return [(n.name, names(n.children)) if n.children else n.name for n in nodes]


@pytest.mark.parametrize("answer, expected", [
    (CLEAN, [("Science", [("Physical sciences", ["Physics", "Chemistry"])])]),
    ('{"fields": [{"name": "A", "sub_fields": [{"name": "B", "disciplines": ["C"]}]}]}', [("A", [("B", ["C"])])]),
    ({"fields": [
        {"name": "  Science  ", "extra": 1, "sub_fields": [
            {"name": "Physical   sciences", "disciplines": [{"name": "Physics"}, {"name": "physics"}, 7, {"name": ""},
                                                             {"description": "no name"}]},
            {"name": "Empty", "disciplines": []},
            {"name": "No list", "disciplines": "Physics"}]},
        {"name": "Hollow", "sub_fields": []},
        "not a node"]},
     [("Science", [("Physical sciences", ["Physics"])])]),
    ({}, []),
    ({"fields": []}, []),
    ("", []),
    ("{not json", []),
    ([1, 2], []),
    (None, []),
])
def test_parse_proposal_never_raises(answer, expected):
    assert names(parse_proposal(answer)) == expected


def test_propose_taxonomy_asks_every_instruction_and_merges():
    calls = []

    def call_llm(prompt: str, prompt_name: str) -> dict:
        calls.append((prompt, prompt_name))
        if "second" in prompt:
            life = {"name": "Life sciences", "disciplines": ["Biology"]}
            return {"fields": [{"name": "science", "sub_fields": [life]}]}
        return CLEAN

    candidates = propose_taxonomy(["first way", "second way"], call_llm, proposals_per_instruction=2)
    assert len(calls) == 4
    assert {name for _, name in calls} == {"taxonomy_propose"}
    assert "first way" in calls[0][0] and "second way" in calls[2][0]
    assert names(candidates) == [("Science", [("Physical sciences", ["Physics", "Chemistry"]),
                                              ("Life sciences", ["Biology"])])]
    assert candidates[0].proposed_by == 4
    assert candidates[0].children[1].proposed_by == 2
    with pytest.raises(InputError, match="propose_instructions is empty"):
        propose_taxonomy([], call_llm)


# --- reviews ---------------------------------------------------------------------------------

SMALL = """\
fields:
  - name: Science
    sub_fields:
      - name: Physical sciences
        disciplines: [Physics, Chemistry, Alchemy]
      - name: Occult sciences
        id: occult
        disciplines: [Astrology, Numerology]
  - name: Arts
    sub_fields:
      - name: Performing arts
        disciplines: [Music, Theatre]
"""

PROPOSED = [CandidateNode("Science", children=(
    CandidateNode("Physical sciences", children=(CandidateNode("Astronomy", proposed_by=1),
                                                 CandidateNode("Phlogiston theory", proposed_by=1)),
                  proposed_by=1),
    CandidateNode("Life sciences", children=(CandidateNode("Biology", proposed_by=1),), proposed_by=1)),
    proposed_by=1)]


@pytest.fixture()
def small(tmp_path) -> Taxonomy:
    path = tmp_path / "small.yaml"
    path.write_text(SMALL)
    return load_taxonomy(path)


def write_reviews(tmp_path, candidates, votes: list[dict[str, str]]) -> list[Path]:
    """One review file per reviewer; `votes` maps 'Field/Sub-field/Discipline' to a decision."""
    paths = []
    for i, decisions in enumerate(votes):
        path = tmp_path / f"review-{i}.yaml"
        write_review_file(candidates, path, reviewer=f"r{i}")
        data = yaml.safe_load(path.read_text())
        for dotted, decision in decisions.items():
            nodes, node = data["fields"], None
            for depth, name in enumerate(dotted.split("/")):
                node = next(n for n in nodes if n["name"] == name)
                nodes = node.get(("sub_fields", "disciplines")[depth] if depth < 2 else "", [])
            node["decision"] = decision
        path.write_text(yaml.safe_dump(data, sort_keys=False))
        paths.append(path)
    return paths


def leaf_names(taxonomy: Taxonomy) -> list[str]:
    return [f"{r.field}/{r.sub_field}/{r.discipline}" for r in taxonomy.disciplines()]


def test_review_file_lists_every_node_with_keep(tmp_path, small):
    candidates = review_candidates(small, PROPOSED)
    path = tmp_path / "review.yaml"
    write_review_file(candidates, path)
    text = path.read_text()
    assert text.startswith("# GLAN taxonomy review.")
    data = yaml.safe_load(text)
    science = data["fields"][0]
    assert science["decision"] == "keep" and science["in_taxonomy"] is True and science["proposed_by"] == 1
    assert [s["name"] for s in science["sub_fields"]] == ["Physical sciences", "Occult sciences", "Life sciences"]
    assert [d["name"] for d in science["sub_fields"][0]["disciplines"]] == [
        "Physics", "Chemistry", "Alchemy", "Astronomy", "Phlogiston theory"]
    assert science["sub_fields"][1]["id"] == "occult"
    assert science["sub_fields"][2]["in_taxonomy"] is False
    decisions = re.findall(r"^ +decision: (\w+)$", text, flags=re.M)
    assert len(decisions) == 2 + 4 + 10 and set(decisions) == {"keep"}


def test_apply_takes_the_majority_of_three_reviews(tmp_path, small):
    candidates = review_candidates(small, PROPOSED)
    paths = write_reviews(tmp_path, candidates, [
        {"Science/Physical sciences/Alchemy": "remove", "Science/Occult sciences": "remove",
         "Science/Physical sciences/Phlogiston theory": "remove", "Arts/Performing arts/Theatre": "remove"},
        {"Science/Physical sciences/Alchemy": "remove", "Science/Occult sciences": "remove",
         "Science/Physical sciences/Phlogiston theory": "remove", "Science/Life sciences/Biology": "remove"},
        {"Science/Physical sciences/Astronomy": "remove", "Science/Physical sciences/Phlogiston theory": "keep"},
    ])
    result = apply_reviews(small, paths)
    assert leaf_names(result) == [
        "Science/Physical sciences/Physics", "Science/Physical sciences/Chemistry",
        "Science/Physical sciences/Astronomy",  # new, kept 2 to 1
        "Science/Life sciences/Biology",  # new, kept 2 to 1
        "Arts/Performing arts/Music", "Arts/Performing arts/Theatre",  # existing, kept 2 to 1
    ]
    # Occult sciences was removed 2 to 1 with everything under it, though its disciplines were kept 3 to 0.
    assert "occult" not in {r.sub_field_id for r in result.disciplines()}
    old_ids = {r.discipline: r.discipline_id for r in small.disciplines()}
    assert all(old_ids[r.discipline] == r.discipline_id for r in result.disciplines() if r.discipline in old_ids)


def test_a_tie_keeps_the_status_quo(tmp_path, small):
    candidates = review_candidates(small, PROPOSED)
    paths = write_reviews(tmp_path, candidates, [
        {"Science/Physical sciences/Alchemy": "remove", "Science/Life sciences": "remove"},
        {"Science/Physical sciences/Astronomy": "remove"},
    ])
    result = leaf_names(apply_reviews(small, paths))
    assert "Science/Physical sciences/Alchemy" in result  # existing, 1 to 1: stays
    assert "Science/Physical sciences/Astronomy" not in result  # new, 1 to 1: not added
    assert "Science/Life sciences/Biology" not in result  # its new parent tied 1 to 1
    assert "Science/Physical sciences/Phlogiston theory" in result  # new, 2 to 0


def test_a_sub_field_whose_disciplines_are_all_removed_is_dropped(tmp_path, small):
    paths = write_reviews(tmp_path, review_candidates(small, []), [
        {"Arts/Performing arts/Music": "remove", "Arts/Performing arts/Theatre": "remove"}])
    result = apply_reviews(small, paths)
    assert [f.name for f in result.fields] == ["Science"]


def test_applied_reviews_dump_and_load_back(tmp_path, small):
    paths = write_reviews(tmp_path, review_candidates(small, PROPOSED), [{}])
    result = apply_reviews(small, paths)
    out = tmp_path / "applied.yaml"
    dump_taxonomy(result, out)
    again = load_taxonomy(out)
    assert again.fields == result.fields
    assert "Science/Life sciences/Biology" in leaf_names(again)
    assert next(r for r in again.disciplines() if r.discipline == "Astrology").discipline_id == "occult.astrology"


def test_a_bad_decision_names_the_node(tmp_path, small):
    (path,) = write_reviews(tmp_path, review_candidates(small, []), [{"Science/Physical sciences/Physics": "maybe"}])
    with pytest.raises(InputError) as err:
        apply_reviews(small, [path])
    assert str(err.value) == (f'{path}: fields[0] "Science" > sub_fields[0] "Physical sciences" > '
                              f"disciplines[0] \"Physics\": decision must be 'keep' or 'remove', got 'maybe'")


def test_removing_everything_is_an_error(tmp_path, small):
    paths = write_reviews(tmp_path, review_candidates(small, []), [{"Science": "remove", "Arts": "remove"}])
    with pytest.raises(InputError, match="remove every discipline"):
        apply_reviews(small, paths)


def test_merge_candidates_adds_counts_and_keeps_first_description():
    a = [CandidateNode("X", "first", (CandidateNode("Y", children=(CandidateNode("Z", proposed_by=1),)),), 1)]
    b = [CandidateNode("x", "second", (CandidateNode("y", children=(CandidateNode("W", proposed_by=1),)),), 2)]
    (merged,) = merge_candidates(a, b)
    assert (merged.name, merged.description, merged.proposed_by) == ("X", "first", 3)
    assert [d.name for d in merged.children[0].children] == ["Z", "W"]
