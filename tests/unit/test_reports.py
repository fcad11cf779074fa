"""The routing report and the default router stored with a library (library_store/store/reports.py)."""
from __future__ import annotations

import pytest

from library_store.store.errors import LibraryError
from library_store.store.library import ExpertLibrary
from library_store.store.reports import (RoutingReport, default_router, read_default_router, read_report,
                                         write_default_router, write_report)
from tests.unit.store_helpers.experts import LLAMA, LLAMA_FP, LLAMA_SHAPES, random_expert

ROUTER = {"mode": "arrow", "top_k": 2, "temperature": 0.3, "disabled": [], "centre": "mean",
          "centre_scope": "prototypes"}


@pytest.fixture
def lib(tmp_path):
    lib = ExpertLibrary.create(tmp_path / "lib", LLAMA_FP, module_shapes=LLAMA_SHAPES)
    for i, name in enumerate(["add", "subtract", "reverse_word"]):
        lib.add(random_expert(LLAMA, name, tasks=[name], seed=i))
    return lib


def _report(lib, split="heldout", **kw) -> RoutingReport:
    fields = dict(experts=lib.names(), tasks=lib.names(), n_per_task=5, accuracy={"user": 0.8, "all": 0.4},
                  per_layer={"layers": [0, 1], "accuracy": [0.5, 0.9]}, confusion=[[0.5, 0.25, 0.25]] * 3,
                  s5={"per_task": {"add": {"arrow": 0.4, "own": 0.5, "ratio": 0.8}}, "overall": 0.8},
                  command="python bench/eval_routing.py --record", date="2026-01-01T00:00:00+00:00")
    return RoutingReport(content_key=lib.content_key(), split=split, router=ROUTER, **{**fields, **kw})


def test_report_round_trip_per_split(lib):
    assert read_report(lib) is None  # never evaluated
    write_report(lib, _report(lib))
    write_report(lib, _report(lib, "paraphrase", accuracy={"user": 0.6}))
    again = ExpertLibrary.open(lib.root)  # read-only, as the page opens it
    got = read_report(again)
    assert got == _report(lib)
    assert got.accuracy["user"] == 0.8 and got.per_layer["accuracy"] == [0.5, 0.9]
    assert read_report(again, "paraphrase").accuracy == {"user": 0.6}
    assert read_report(again, "train") is None
    write_report(lib, _report(lib, accuracy={"user": 0.9}))  # a newer evaluation replaces the older one
    assert read_report(again).accuracy == {"user": 0.9}
    assert len([d for d in lib.list_derived() if d["kind"] == "routing-report"]) == 2


def test_changed_experts_have_no_report_and_no_default_router(lib):
    write_report(lib, _report(lib))
    write_default_router(lib, ROUTER, {"rule": "best own-text accuracy on training prompts"})
    assert read_report(lib) is not None and default_router(lib) == ROUTER
    old = lib.content_key()
    lib.add(random_expert(LLAMA, "first_letter", tasks=["first_letter"], seed=9))
    assert lib.content_key() != old
    assert read_report(lib) is None and default_router(lib) is None and read_default_router(lib) is None
    with pytest.raises(LibraryError, match="experts changed"):
        write_report(lib, RoutingReport(old, "heldout", ROUTER))
    write_default_router(lib, {**ROUTER, "top_k": 3}, {"rule": "r"})  # the stale entry is dropped
    kinds = [d for d in lib.list_derived() if d["kind"] == "router-default"]
    assert len(kinds) == 1 and kinds[0]["config"]["content"] == lib.content_key()
    assert default_router(lib)["top_k"] == 3


def test_default_router_with_evidence(lib):
    evidence = {"rule": "r", "split": "train", "sweep": [{"top_k": 2, "accuracy_user": 0.9}]}
    write_default_router(lib, ROUTER, evidence, command="python bench/eval_routing.py --sweep --record",
                         date="2026-01-01")
    rec = read_default_router(ExpertLibrary.open(lib.root))
    assert rec.router == ROUTER and rec.evidence == evidence and rec.content_key == lib.content_key()
    assert rec.command.endswith("--record") and rec.date == "2026-01-01"


def test_writes_are_explicit_and_checked(lib):
    ro = ExpertLibrary.open(lib.root)  # read-only
    with pytest.raises(LibraryError, match="readonly=False"):
        write_report(ro, _report(lib))
    with pytest.raises(LibraryError, match="read-only"):
        write_default_router(ro, ROUTER, {})
    assert read_report(ro) is None and default_router(ro) is None  # nothing went to the user cache either
    with pytest.raises(ValueError, match="Unknown router fields"):
        write_default_router(lib, {**ROUTER, "topk": 2}, {})
    with pytest.raises(ValueError, match="with a 'mode'"):
        write_default_router(lib, {"top_k": 2}, {})
    with pytest.raises(ValueError, match="Unknown split"):
        RoutingReport(lib.content_key(), "test", ROUTER)
    with pytest.raises(ValueError, match="Unknown split"):
        read_report(lib, "dev")


def test_unknown_fields_of_a_newer_writer_are_kept_in_extra(lib):
    data = {**_report(lib).to_dict(), "calibration": {"ece": 0.1}}
    got = RoutingReport.from_dict(data)
    assert got.extra == {"calibration": {"ece": 0.1}} and got.accuracy == {"user": 0.8, "all": 0.4}
