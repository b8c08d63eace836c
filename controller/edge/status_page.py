"""The status page: server-rendered HTML of the models and their workers, refreshing itself.

No script, no external asset: one inline stylesheet allowed by its hash in the
``Content-Security-Policy``, which allows nothing else, and a ``<meta http-equiv="refresh">``.
Every string a worker supplied (its name, its model names) is escaped. The page is bounded:
each of its two tables shows at most ``rows`` rows and says how many more there are.
"""

from __future__ import annotations

import base64
import hashlib
import html
from collections.abc import Iterator, Sequence

from ..decisions.overview import ModelView, WorkerView, by_model, summarize
from ..status_format import MODEL_COLUMNS, WORKER_COLUMNS, About, model_cells, worker_cells

__all__ = ["CONTENT_SECURITY_POLICY", "DEFAULT_REFRESH", "DEFAULT_ROWS", "HEADERS", "render"]

#: seconds between two loads of the page (``?refresh=``; 0 stops it)
DEFAULT_REFRESH = 5
#: rows each table shows at most (``?rows=``)
DEFAULT_ROWS = 500

_STYLE = (
    "body{font:14px/1.4 system-ui,sans-serif;margin:1.5em;color:#1d1d1d;background:#fff}"
    "h1{font-size:1.4em;margin:0 0 .2em}h2{font-size:1.15em;margin:1.5em 0 .4em}"
    "h3{font:600 1em monospace;margin:1.2em 0 .3em}"
    "table{border-collapse:collapse;margin-bottom:.4em}"
    "th,td{padding:.2em .8em;border-bottom:1px solid #ddd;text-align:left}"
    "th{background:#f3f3f3;font-weight:600}td.w{font-family:monospace}"
    "tr.healthy td.s{color:#176b2c}tr.expiring td.s{color:#8a5a00}"
    "tr.ejected td.s{color:#b00020;font-weight:600}p.note{color:#555}"
)
_STYLE_HASH = base64.b64encode(hashlib.sha256(_STYLE.encode()).digest()).decode()

#: nothing from anywhere, the page's own stylesheet excepted; no framing, no forms
CONTENT_SECURITY_POLICY = (
    f"default-src 'none'; style-src 'sha256-{_STYLE_HASH}'; base-uri 'none'; "
    "form-action 'none'; frame-ancestors 'none'"
)
#: sent with the page
HEADERS = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}

_e = html.escape


def _plural(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


def _header_row(columns: Sequence[str]) -> str:
    return "<tr>" + "".join(f"<th>{_e(c)}</th>" for c in columns) + "</tr>"


def _model_row(m: ModelView) -> str:
    name, *numbers = model_cells(m)
    return (
        f'<tr data-model="{_e(m.name)}"><td class="w">{_e(name)}</td>'
        + "".join(f"<td>{n}</td>" for n in numbers)
        + "</tr>"
    )


def _worker_row(w: WorkerView) -> str:
    name, state, *rest = worker_cells(w)
    return (
        f'<tr class="{w.state.value}" data-worker="{_e(w.name)}"><td class="w">{_e(name)}</td>'
        f'<td class="s">{_e(state)}</td>' + "".join(f"<td>{_e(c)}</td>" for c in rest) + "</tr>"
    )


def _more(hidden: int, what: str) -> str:
    return (
        f'<p class="note more">{hidden} more {what}{"" if hidden == 1 else "s"} not shown: '
        "narrow the page with <code>?model=NAME</code>, show more with "
        "<code>?rows=N</code>, or read <code>/api/workers</code></p>"
    )


def render(
    about: About,
    workers: Sequence[WorkerView],
    *,
    rows: int = DEFAULT_ROWS,
    refresh: int = DEFAULT_REFRESH,
    model: str | None = None,
) -> Iterator[str]:
    """The page for ``workers`` (those serving ``model`` when the page was asked for one),
    in pieces: one per table row, so that a caller can yield to the loop between them."""
    models = summarize(workers)
    refreshing = f'<meta http-equiv="refresh" content="{refresh}">' if refresh > 0 else ""
    scope = f" serving <code>{_e(model)}</code>" if model is not None else ""
    every = f"refreshes every {refresh} s" if refresh > 0 else "does not refresh"
    yield (
        '<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"{refreshing}<title>fc-controller status</title><style>{_STYLE}</style></head>"
        "<body><h1>fc-controller status</h1>"
        f'<p class="note" id="about">{_e(about.headline())}</p>'
        f'<p id="counts">{_plural(len(workers), "worker")}{scope}, '
        f"{_plural(len(models), 'model')}; this page {every}.</p>"
    )
    if not workers:
        yield (
            f'<p id="empty">No workers are registered{scope}. A worker registers itself '
            "with this controller at start-up, for example <code>fc-demo-worker --port "
            "21002 --worker-address http://localhost:21002</code>.</p></body></html>"
        )
        return
    yield f'<h2>Models</h2><table id="models">{_header_row(MODEL_COLUMNS)}'
    for m in models[:rows]:
        yield _model_row(m)
    yield "</table>"
    if len(models) > rows:
        yield _more(len(models) - rows, "model")
    yield "<h2>Workers by model</h2>"
    budget = rows
    hidden = 0
    for name, serving in by_model(workers).items():
        if budget <= 0:
            hidden += len(serving)
            continue
        shown = serving[:budget]
        budget -= len(shown)
        hidden += len(serving) - len(shown)
        yield (
            f'<section class="model" data-model="{_e(name)}"><h3>{_e(name)}</h3>'
            f'<table class="workers">{_header_row(WORKER_COLUMNS)}'
        )
        for w in shown:
            yield _worker_row(w)
        yield "</table></section>"
    if hidden:
        yield _more(hidden, "worker row")
    yield (
        '<p class="note">Queue: the requests dispatch believes a worker holds. In flight: '
        "the requests this controller is relaying to it now. Expiring: a heartbeat is late. "
        "Ejected: out of rotation after failed requests. The same data as JSON: "
        "<code>/api/workers</code>, <code>/api/models</code>.</p></body></html>"
    )
