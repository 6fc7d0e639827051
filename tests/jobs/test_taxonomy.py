"""`glan taxonomy propose` and `apply` through the real client against the loopback test server."""

from __future__ import annotations

import yaml

from jobs.glan.taxonomy import load_taxonomy
from jobs.taxonomy import main
from tests.taxonomies import TWO_DISCIPLINES as TAXONOMY


def _nodes(nodes):
    for node in nodes or []:
        yield node
        yield from _nodes(node.get("sub_fields") or node.get("disciplines"))


def test_propose_writes_a_review_file_and_apply_takes_the_majority(fake_llm, tmp_path, monkeypatch):
    monkeypatch.setenv("GLAN_TEST_KEY", "sk-test")
    taxonomy = tmp_path / "taxonomy.yaml"
    taxonomy.write_text(TAXONOMY)
    common = ["--set", f"taxonomy.file={taxonomy}", "--set", "llm.endpoint=openai",
              "--set", f"llm.base_url={fake_llm.url}", "--set", "llm.api_key_env=GLAN_TEST_KEY"]
    review = tmp_path / "review.yaml"
    assert main(["propose", "--out", str(review), *common]) == 0
    assert fake_llm.count(kind="taxonomy_propose") >= 2  # several differently worded instructions

    data = yaml.safe_load(review.read_text())
    nodes = list(_nodes(data["fields"]))
    names = [n["name"] for n in nodes]
    assert "Mathematics" in names and "Logic" in names  # the current taxonomy is up for review too
    assert sum(1 for n in nodes if not n["in_taxonomy"]) > 0  # plus the model's proposals
    assert {n["decision"] for n in nodes} == {"keep"}

    # Two of three reviewers remove Logic and the proposed fields: the majority removes them.
    for node in _nodes(data["fields"]):
        if node["name"] == "Logic" or not node["in_taxonomy"]:
            node["decision"] = "remove"
    paths = []
    for i, content in enumerate([data, data, yaml.safe_load(review.read_text())]):
        path = tmp_path / f"review{i}.yaml"
        path.write_text(yaml.safe_dump(content, sort_keys=False))
        paths.append(str(path))
    out = tmp_path / "new_taxonomy.yaml"
    assert main(["apply", *paths, "--out", str(out), *common]) == 0
    assert [d.discipline for d in load_taxonomy(out).disciplines()] == ["Mathematics"]
