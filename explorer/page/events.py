"""What every page handler returns besides plain values: `Update` (new component properties, made a
`gr.update` by the ui), page messages, and the wait for the model. Shared by the Explore and Library handlers.

Usage::

    return {"notice": messages(["top-k clamped to 4"]), "expert": update(choices=["a", "b"], value=None)}
"""
from __future__ import annotations

import html
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from explorer.page.session import Session


@dataclass(frozen=True)
class Update:
    """New properties for a component (ui.py makes it a `gr.update`)."""

    props: dict


def update(**props) -> Update:
    return Update(props)


def messages(lines: list[str], kind: str = "note") -> str:
    """Escaped page messages (they may quote library names, expert names or settings); `kind` "note", "warning"
    (an uncertain result) or "error"."""
    mark = "⚠️" if kind in ("error", "warning") else "ℹ️"
    return "\n\n".join(f"{mark} {html.escape(line)}" for line in lines)


def ensure_loaded(session: "Session", progress=None) -> str | None:
    """Wait for the model (reporting progress); the error message if it could not load."""
    reg = session.registry
    if not reg.ready and not reg.wait(progress=progress):
        return reg.error
    return None
