"""Provenance names the code a process runs: the commit read at import, not HEAD when a result is written."""

from add_bench import provenance as prov


def test_provenance_keeps_the_commit_imported_at_start(monkeypatch):
    imported = prov.IMPORTED_COMMIT
    assert imported == prov.git_commit()  # nothing committed since this process started
    # a commit made while a long sweep runs moves HEAD; the running worker still has the old code
    monkeypatch.setattr(prov, "git_commit", lambda: "0" * 40)
    p = prov.provenance(seed=3, wall_time_s=1.234, command="x")
    assert p["git_commit"] == imported != "0" * 40
    assert p["seed"] == 3 and p["wall_time_s"] == 1.23 and p["machine"]["cpu_count"] >= 1
