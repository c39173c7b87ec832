"""One self-contained HTML page about an edit: config, rounds, layers, projections and ablation.

`write_report(edit_or_folder, "report.html")` needs no model: everything comes from the edit's
history and snapshots. Ablation rows (from `are_lens.ablate`) are included when passed, or when the
edit folder holds an ``ablation.json`` written by `are_lens.ablation.save_ablation`. Figures are PNGs
embedded as base64, so the page is a single file that opens anywhere.
"""

from __future__ import annotations

import argparse
import base64
import html
import math
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from . import inspect
from .ablation import load_ablation
from .artifact import Edit

ROUND_COLUMNS = ("round", "fresh_d_accuracy", "fresh_d_accuracy_pooled", "d_loss", "adapter_loss", "projection",
                 "cosine", "mean_gap_left", "target_drift", "converged", "seconds", "adapter_seconds")
ABLATION_FIGURES = ("fresh_d_accuracy", "projection", "cosine", "mean_gap_left", "target_drift", "metric")

_STYLE = """
body { font-family: -apple-system, 'Segoe UI', Helvetica, Arial, sans-serif; margin: 24px auto; max-width: 1100px;
       color: #222; padding: 0 16px; }
h1 { font-size: 1.6em; margin-bottom: 0.2em; }
h2 { border-bottom: 1px solid #ddd; padding-bottom: 4px; margin-top: 1.6em; }
.sub { color: #666; margin-top: 0; }
table { border-collapse: collapse; font-size: 0.82em; margin: 8px 0 16px; }
.wide { overflow-x: auto; }
th, td { border: 1px solid #ddd; padding: 3px 8px; text-align: right; }
th { background: #f3f5f8; } td.text, th.text { text-align: left; }
tr:nth-child(even) td { background: #fafbfc; }
img { max-width: 100%; border: 1px solid #eee; margin: 6px 0; }
.note { color: #555; font-size: 0.9em; max-width: 900px; }
code { background: #f3f3f3; padding: 0 3px; }
"""


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.3g}" if abs(value) >= 1000 or 0 < abs(value) < 1e-3 \
            else f"{value:.3f}"
    if isinstance(value, (list, tuple)):
        return html.escape(", ".join(str(v) for v in value))
    return html.escape(str(value))


def table(rows: Sequence[dict[str, Any]], columns: Sequence[str] | None = None, css_id: str | None = None) -> str:
    """An HTML table of dict rows; columns default to the union of keys in first-seen order."""
    if columns is None:
        columns = list(dict.fromkeys(k for row in rows for k in row))
    columns = [c for c in columns if any(c in row for row in rows)]
    ident = f' id="{css_id}"' if css_id else ""
    head = "".join(f'<th class="text">{html.escape(c)}</th>' if i == 0 else f"<th>{html.escape(c)}</th>"
                   for i, c in enumerate(columns))
    body = []
    for row in rows:
        cells = []
        for i, c in enumerate(columns):
            value = row.get(c)
            cls = ' class="text"' if i == 0 or isinstance(value, (str, list)) else ""
            cells.append(f"<td{cls}>{_cell(value)}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    return (f'<div class="wide"><table{ident}><thead><tr>{head}</tr></thead><tbody>{"".join(body)}</tbody>'
            "</table></div>")


def ablation_variants(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """`ablate` rows in long form for display: one row per variant (full, none, without X, only X)."""
    out = []
    for row in rows:
        if row["layer"] in ("full", "none"):
            name = "full edit" if row["layer"] == "full" else "none (base model)"
            out.append({"variant": name, **{k: row[k] for k in ABLATION_FIGURES if k in row}})
            continue
        for suffix, word in (("_without", "without"), ("_only", "only")):
            out.append({"variant": f"{word} {row['layer']}",
                        **{k: row[k + suffix] for k in ABLATION_FIGURES if k + suffix in row}})
    return out


def _image(draw: Callable[[Path], Any], alt: str) -> str:
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "figure.png"
        draw(path)
        data = base64.b64encode(path.read_bytes()).decode("ascii")
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{data}">'


def _config_rows(config: dict[str, Any]) -> list[dict[str, Any]]:
    return [{"option": k, "value": v if isinstance(v, (int, float, str, bool, list, tuple)) or v is None else str(v)}
            for k, v in config.items()]


def render(result: Edit, ablation: Sequence[dict[str, Any]] | None = None, title: str | None = None) -> str:
    """The report page of `result` as an HTML string."""
    history = result.history
    name = result.concept.get("name", "edit") if result.concept else "edit"
    title = title or f"ARE edit report: {name}"
    last = history[-1] if history else {}
    summary = (f"{len(result.interventions)} adapter(s) at {', '.join(dict.fromkeys(result.hooks)) or '—'}; "
               f"reads {', '.join(result.config.get('read', [])) or '—'}; {max(len(history) - 1, 0)} adapter round(s); "
               f"final fresh-D accuracy {_cell(last.get('fresh_d_accuracy'))}; "
               f"{'converged' if result.converged else 'not converged'}.")
    parts = [f"<h1>{html.escape(title)}</h1>", f'<p class="sub">{html.escape(summary)}</p>']

    parts.append("<h2>Rounds</h2>")
    if history:
        band = result.config.get("stop_band")
        parts.append(_image(lambda p: inspect.plot_rounds(history, p, band), "rounds"))
        parts.append(table([{k: h.get(k) for k in ROUND_COLUMNS if k in h} for h in history], ROUND_COLUMNS,
                           "rounds"))
        parts.append('<p class="note">fresh_d_accuracy: held-out accuracy of a discriminator trained from scratch '
                     "on the edited read features (0.5 = indistinguishable). projection / cosine: the edited "
                     "source mean's shift along the base source→target gap (1 = all the way); mean_gap_left: "
                     "the distance still between the edited source and target means, target_drift: how far "
                     "the edit moved the target mean, both as shares of the base gap.</p>")
    else:
        parts.append("<p>This edit holds no training history.</p>")

    parts.append("<h2>Layers</h2>")
    layer_rows = result.layers()
    if layer_rows:
        parts.append(table(layer_rows, None, "layers"))
        parts.append('<p class="note">Adapter rows: weight norm and the last round\'s change of the activation at '
                     "the hook (mean ‖Δh‖, relative to ‖h‖, cosine to the base activation; Δh includes upstream "
                     "adapters). Read rows: held-out accuracy of a fresh linear probe on that stream alone, "
                     "before the edit and at the last round.</p>")
    if any(h.get("probe_accuracy") or h.get("adapters") for h in history):
        parts.append(_image(lambda p: inspect.plot_layers(history, p), "per-layer heatmaps"))

    if result.snapshots:
        parts.append("<h2>Projections</h2>")
        parts.append(_image(lambda p: inspect.plot_projections(result.snapshots, p, method="gap"), "gap projection"))
        parts.append(_image(lambda p: inspect.plot_projections(result.snapshots, p), "PCA projection"))
        parts.append('<p class="note">Last-token read features of the training prompts at chosen rounds, in one basis '
                     "for all shown points: first with the x axis along the base source→target mean gap, then "
                     "on the first two principal components. The source cloud should move onto the target "
                     "cloud as the rounds go on.</p>")

    if ablation:
        parts.append("<h2>Ablation</h2>")
        parts.append(_image(lambda p: inspect.plot_ablation(ablation, p), "ablation"))
        parts.append(table(ablation_variants(ablation), None, "ablation"))
        parts.append('<p class="note">Each figure measured like a round (fresh discriminator, last prompt token, the '
                     "edit's held-out split) under a variant of the edit: the trained edit, no adapters (the base "
                     "model), each adapter layer removed, each adapter layer alone; <code>metric</code> is the "
                     "caller's behaviour metric.</p>")

    parts.append("<h2>Config</h2>")
    parts.append(table(_config_rows(result.config), ("option", "value"), "config"))
    if result.concept:
        parts.append("<h2>Concept</h2>")
        parts.append(table(_config_rows(result.concept), ("option", "value"), "concept"))
    if result.fingerprint:
        parts.append("<h2>Base model</h2>")
        parts.append(table(_config_rows(result.fingerprint), ("option", "value"), "fingerprint"))

    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>{html.escape(title)}</title><style>{_STYLE}</style></head><body>\n"
            + "\n".join(parts) + "\n</body></html>\n")


def write_report(
    edit: Any, out: str | Path = "report.html", ablation: Any = None, title: str | None = None
) -> Path:
    """Write the report of `edit` (an `Edit` or a saved edit folder) to `out`; returns its path.

    `ablation`: rows from `are_lens.ablate`; when None and `edit` is a folder holding ``ablation.json``,
    those rows are used.
    """
    if isinstance(edit, (str, Path)):
        folder = Path(edit)
        result = Edit.load(folder)
        if ablation is None:
            ablation = load_ablation(folder)
    elif isinstance(edit, Edit):
        result = edit
    else:
        raise TypeError(f"edit= must be an are_lens.Edit or a saved edit folder; got {type(edit).__name__}")
    if ablation is not None and (isinstance(ablation, (str, bytes)) or not all(isinstance(r, dict) for r in ablation)):
        raise TypeError("ablation= must be the list of rows returned by are_lens.ablate")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(render(result, ablation, title), encoding="utf-8")
    return out


# -- are-lens report ------------------------------------------------------------------------------

def add_parser(commands: Any) -> None:
    """The `are-lens report` subcommand (registered by are_lens.cli)."""
    rep = commands.add_parser(
        "report", help="write one self-contained HTML page about a saved edit",
        description="Write an HTML report of a saved edit: config, rounds, per-layer tables, heatmaps and "
        "projections. With --model and --concept-file it also runs the leave-one-out / leave-one-in ablation "
        "and stores it as EDIT_DIR/ablation.json; without them, a stored ablation.json is shown when present.",
    )
    rep.add_argument("edit_dir", metavar="EDIT_DIR", help="a saved edit folder (Edit.save)")
    rep.add_argument("--out", default=None, help="HTML file to write (default: EDIT_DIR/report.html)")
    rep.add_argument("--title", default=None)
    rep.add_argument("--model", default=None, help="model name or local HF folder, for the ablation")
    rep.add_argument("--concept-file", default=None, help="CSV/JSON/JSONL with the concept's prompts, for the "
                     "ablation (use the file the edit was trained on: the held-out split is recomputed from it)")
    rep.add_argument("--source-column", default="source")
    rep.add_argument("--target-column", default="target")
    rep.add_argument("--seed", type=int, default=0, help="seed of the ablation's discriminators")
    rep.add_argument("--save-ablation", action=argparse.BooleanOptionalAction, default=True,
                     help="store the ablation rows as EDIT_DIR/ablation.json (default: yes)")


def run_cli(args: Any, parser: Any) -> int:
    """Run `are-lens report` from parsed arguments."""
    from . import fingerprint
    from .ablation import ablate, save_ablation
    from .concept import Concept

    folder = Path(args.edit_dir)
    try:
        result = Edit.load(folder)
    except (FileNotFoundError, ValueError) as err:
        parser.error(f"cannot load edit {args.edit_dir!r}: {err}")
    if (args.model is None) != (args.concept_file is None):
        parser.error("--model and --concept-file go together (both are needed to run the ablation)")
    ablation = load_ablation(folder)
    if args.model is not None:
        from .backends import backend_for
        from .models import load_model

        known = result.concept or {}
        try:
            concept = Concept.from_file(args.concept_file, args.source_column, args.target_column,
                                        chat=bool(known.get("chat", False)), system=known.get("system"),
                                        held_out=float(known.get("held_out", 0.2)), name=known.get("name", "concept"))
        except (FileNotFoundError, KeyError, ValueError) as err:
            parser.error(f"--concept-file: {err}")
        model = load_model(args.model)
        try:
            fingerprint.check(result.fingerprint, backend_for(model), False, f"ablate the edit on {args.model!r}")
        except ValueError as err:
            parser.error(str(err))
        ablation = ablate(result, model, concept, seed=args.seed)
        if args.save_ablation:
            print(f"ablation stored in {save_ablation(ablation, folder)}")
    out = write_report(result, args.out or folder / "report.html", ablation, args.title)
    print(f"report written to {out}")
    return 0
