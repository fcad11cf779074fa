"""What `bench/eval_routing.py --record` stores in a library (library_store.store.reports): the routing report of
the split and, after a sweep, the default router with its evidence and the per-prompt pick readout fitted beside
it. The page and the CLI only read these."""
from __future__ import annotations


def record(lib, r: dict, readout=None) -> None:
    """Store the RoutingReport (and, after a sweep, the default router with its evidence, and the pick readout
    fitted beside it) in the library."""
    from explorer.routing.config import RouterConfig
    from explorer.routing.readout import readout_key
    from library_store.store.reports import RoutingReport, write_default_router, write_readout, write_report

    if r["sweep"] is not None:
        write_default_router(lib, r["router"], r["sweep"]["evidence"], r["command"], r["date"])
    if readout is not None:
        write_readout(lib, readout_key(RouterConfig.from_dict(r["router"])), *readout.to_tensors())
    write_report(lib, RoutingReport(
        content_key=r["content_key"], split=r["split"], router=r["router"], level=r["level"], experts=r["experts"],
        tasks=r["tasks"], n_per_task=r["n_per_task"], accuracy={w: a["mean"] for w, a in r["accuracy"].items()},
        per_layer=r["per_layer"], per_module=r["per_module"], per_task=r["per_task"], confusion=r["confusion"],
        entropy=r["entropy"], margin=r["margin"], centring=r["centring"],
        sweep=r["sweep"]["rows"] if r["sweep"] else [], s5=r["s5"], command=r["command"], date=r["date"],
        model=r["model"], extra={"router_source": r["router_source"], "goals_met": r["goals_met"],
                                 "figures": r["figures"]}))
