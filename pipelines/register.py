"""The DVC ``register`` stage: the promotion gate's decision, written to ``gate.json``.

A candidate is promoted only if its primary metric beats the zero-shot prompt by
``register.min_margin_over_zero_shot`` and is at most ``register.prod_tolerance`` worse
than the version now in ``prod``. The stage only decides (a refusal is not an error);
``ptune register`` (pipelines/registry.py) then versions the run and acts on the decision.
"""
from __future__ import annotations

import logging
from datetime import datetime, timezone
from pathlib import Path

from pipelines import evaluation
from pipelines.common import write_json
from pipelines.config import RegisterConfig
from pipelines.registry import artifact_name, evaluation_at, primary_scores, prod_version, repo_path

log = logging.getLogger(__name__)


def gate(cfg: RegisterConfig, metrics: dict, prod: dict | None) -> dict:
    """Decide promotion of the candidate described by ``metrics`` (the evaluate stage's).

    ``prod`` is ``{"version": ..., "metrics": <that version's metrics or None>}`` for the
    version now in prod, or None when there is none. Pure: no I/O.
    """
    key, cand, zero = primary_scores(metrics, "metrics")
    margin = cand - zero
    ok_zero = margin >= cfg.min_margin_over_zero_shot
    reasons = [f"{'pass' if ok_zero else 'FAIL'}: {key} {cand:.2f} is {margin:+.2f} over the zero-shot "
               f"prompt ({zero:.2f}); at least {cfg.min_margin_over_zero_shot:+.2f} required"]
    ok_prod, prod_info = True, None
    if prod is None:
        reasons.append("pass: no version in prod yet, nothing to compare against")
    else:
        ref = ((prod.get("metrics") or {}).get("tuned") or {}).get(key)
        prod_info = {"version": prod["version"], "value": ref}
        if ref is None:
            # A prod version we cannot compare with is no evidence that the candidate is better.
            ok_prod = False
            reasons.append(f"FAIL: prod {prod['version']} has no committed {key} to compare against; "
                           f"re-register it with its metrics, or move prod off it with `gto`")
        else:
            ok_prod = cand >= ref - cfg.prod_tolerance
            reasons.append(f"{'pass' if ok_prod else 'FAIL'}: {key} {cand:.2f} vs prod {prod['version']} "
                           f"{ref:.2f} ({cand - ref:+.2f}); at most {cfg.prod_tolerance:.2f} worse allowed")
    return {"passed": bool(ok_zero and ok_prod), "reasons": reasons, "primary_metric": key,
            "candidate": cand, "zero_shot": zero, "prod": prod_info,
            "decided_at": datetime.now(timezone.utc).isoformat(timespec="seconds")}


def run(cfg: RegisterConfig, metrics_path: Path, details_path: Path, out: Path, repo: Path) -> dict:
    """The DVC ``register`` stage: record the gate's decision. A refusal is not an error."""
    metrics = evaluation.read(metrics_path, details_path)
    prod = prod_version(repo, artifact_name(repo))
    if prod:
        prod["metrics"] = evaluation_at(repo, prod.pop("commit"), repo_path(repo, Path(metrics_path)))
    decision = gate(cfg, metrics, prod)
    write_json(out, decision)
    for reason in decision["reasons"]:
        log.info("gate: %s", reason)
    log.info("gate: %s", "passed" if decision["passed"] else "refused (nothing will be registered)")
    return decision
