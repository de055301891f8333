"""The report of a results folder: one self-contained HTML page and a Markdown summary.

`render(folder, records)` takes the experiment records saved there (`NAME.json`, written by
`batchnorm_lab.experiments.run_into`, loaded by `experiments.load_results`), and writes:

- `report.html`: a summary table (claim, result, held), then one section per experiment
  with its setup, the criteria and the numbers they were judged on, the plots embedded as
  base64 PNG (the page needs no other file), and the exact configuration and environment;
  the CSS reflows for a phone and a laptop;
- `summary.md`: the same in Markdown, the plots linked beside it.

Both come from the jinja2 templates in `batchnorm_lab/templates/`.
"""

from __future__ import annotations

import base64
import datetime
import json
from pathlib import Path

import jinja2

from .files import write_atomic

TEMPLATES = Path(__file__).with_name("templates")


def render(folder: str | Path, records: list[dict], title: str | None = None) -> tuple[Path, Path]:
    """Write folder/report.html and folder/summary.md from `records`, the ones saved there
    (plots are read beside them); their paths."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ValueError(f"no results folder at {folder}: run `batchnorm demo` or `batchnorm run NAME --out DIR` first")
    if not records:
        raise ValueError(f"{folder} holds no experiment results (NAME.json files); nothing to report")
    for record in records:
        record["images"] = [_embed(folder / name) for name in record.get("plots", [])]
        for judged in (record, *record.get("other_inits", {}).values()):
            _with_verdicts(judged)
    context = {
        "title": title or folder.name,
        "records": records,
        "held_count": sum(r["verdict"] == "held" for r in records),
        "inconclusive_count": sum(r["verdict"].startswith("inconclusive") for r in records),
        "generated": datetime.datetime.now().isoformat(timespec="seconds"),
        "source": str(folder),
    }
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(TEMPLATES),
        autoescape=jinja2.select_autoescape(["html.j2"]),
        undefined=jinja2.StrictUndefined,
        keep_trailing_newline=True,
    )
    env.filters["compact"] = compact
    env.filters["badge"] = lambda verdict: BADGES.get(verdict, "not")
    env.filters["answer"] = lambda status: ANSWERS.get(status, status)
    env.filters["cell"] = lambda text: str(text).replace("|", "\\|").replace("\n", " ")
    html = folder / "report.html"
    markdown = folder / "summary.md"
    write_atomic(html, env.get_template("report.html.j2").render(context).encode())
    write_atomic(markdown, env.get_template("summary.md.j2").render(context).encode())
    return html, markdown


# The CSS class of a verdict's (or a check's status's) badge.
BADGES = {"held": "held", "did not hold": "not", "inconclusive at this length": "unsure"}
# A check's status, as the answer to its question.
ANSWERS = {"held": "yes", "did not hold": "no", "inconclusive at this length": "inconclusive"}


def _with_verdicts(record: dict) -> None:
    """Give a record saved before verdicts had three values (held, did not hold, inconclusive)
    its `verdict` and each check its `status` and `why`, from `held`."""
    record.setdefault("verdict", "held" if record["held"] else "did not hold")
    for check in record.get("checks") or []:
        check.setdefault("status", "held" if check["held"] else "did not hold")
        check.setdefault("why", "")


def _embed(path: Path) -> dict:
    """{"name", "data"}: the PNG as base64, or data None when the file is missing."""
    data = base64.b64encode(path.read_bytes()).decode("ascii") if path.is_file() else None
    return {"name": path.name, "data": data}


def compact(value, digits: int = 4) -> str:
    """JSON of `value` with floats rounded to `digits` significant digits, on one line."""

    def rounded(v):
        if isinstance(v, float):
            return float(f"{v:.{digits}g}")
        if isinstance(v, dict):
            return {k: rounded(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [rounded(x) for x in v]
        return v

    return json.dumps(rounded(value), separators=(", ", ": "))
