"""`fedmeerkat report RUN_DIR`: a run's accuracy and communication, next to a dense download."""

from __future__ import annotations

import json
from pathlib import Path

from fedmeerkat.runners.run_folder import BEST_STATE, METRICS, SUMMARY, MetricsLog


def human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1000
    return f"{n:.2f} GB"


def _num(x: float | None) -> str:
    return "-" if x is None else f"{x:.4f}"


def run_report(run_dir: Path) -> str:
    summary_path = run_dir / SUMMARY
    if not summary_path.is_file():
        raise FileNotFoundError(f"{run_dir} holds no summary.json (run not finished?)")
    s = json.loads(summary_path.read_text())
    records = MetricsLog(run_dir / METRICS).read()
    lines = [
        f"run {run_dir}: {s['method']} on {s['task']} with {s['model']}",
        f"clients {s['clients']} ({s.get('clients_per_round', s['clients'])} per round"
        f"{', drawn by size' if s.get('client_sampling') == 'size' else ''}), "
        f"T={s['local_steps']}, downlink {s.get('downlink', 'sparse-weights')}, "
        f"mask {s['mask_nnz']:,} weights (density {s['density']:.1e})",
        "",
        f"{'round':>5}  {'train loss':>10}  {'test acc':>8}  {'up/client':>10}  {'down/client':>11}"
        f"  {'missing':>8}  {'rejected':>8}",
    ]
    reasons = []
    for r in records:
        n = max(1, len(r.get("bytes", {})))
        loss = f"{r['train_loss']:.4f}" if r.get("train_loss") is not None else "-"
        if r.get("failed"):
            loss = "failed"
        acc = f"{r['test_accuracy']:.4f}" if r.get("test_accuracy") is not None else "-"
        up = human(r["bytes_up"] / n) if r["round"] else "-"
        down = human(r["bytes_down"] / n) if r["round"] else "-"
        # a failed round's clients are in its last attempt
        last = r["attempts"][-1] if r.get("failed") and r.get("attempts") else r
        missing = ",".join(map(str, last.get("missing", []))) or "-"
        rejected = last.get("rejected", {})
        reasons += [f"round {r['round']}: client {k} rejected: {why}"
                    for k, why in rejected.items()]
        lines.append(f"{r['round']:>5}  {loss:>10}  {acc:>8}  {up:>10}  {down:>11}"
                     f"  {missing:>8}  {','.join(rejected) or '-':>8}")
    dense = s.get("dense_model_bytes")
    lines += [
        *([""] + reasons if reasons else []),
        "",
        # a deployed run whose evaluations all failed has none (None): shown as "-"
        f"accuracy: {_num(s['initial_accuracy'])} zero-shot -> {_num(s['final_accuracy'])}",
        *[f"{name}: {s[f'initial_{k}']:.4f} zero-shot -> {s[f'final_{k}']:.4f}"
          for k, name in (("auc", "ROC-AUC"), ("macro_f1", "macro-F1"),
                          ("best_shift_accuracy", "best-shift accuracy"))
          if s.get(f"initial_{k}") is not None and s.get(f"final_{k}") is not None],
        f"per client per round (mean): upload {human(s['upload_bytes_per_client'])}, "
        f"download {human(s['download_bytes_per_client'])}",
        f"total: upload {human(s['upload_bytes_total'])}, download {human(s['download_bytes_total'])}",
    ]
    if s.get("best_val_round") is not None:
        test = s.get("best_val_round_test_auc", s.get("best_val_round_test_macro_f1"))
        kept = (run_dir / BEST_STATE).is_file()
        lines.append(f"best validation round: {s['best_val_round']} (validation "
                     f"{_num(s['best_val_metric'])}, test {_num(test)})"
                     + ("; its model: best_state.safetensors (export --best)" if kept else ""))
    if dense:
        ratio = dense / max(1.0, s["download_bytes_per_client"])
        lines.append(f"a dense full-model download would be {human(dense)} per client per round "
                     f"({ratio:,.0f}x this run's download)")
    dp = s.get("dp")
    if dp:  # differentially private scalars (federated/dp.py)
        spent = ", ".join(f"{k}: {v:.3f}" for k, v in dp["epsilon_spent"].items())
        sigmas = list(dp.get("noise_multiplier_per_client", {}).values())
        sigma = (f"{min(sigmas):.4f}-{max(sigmas):.4f} (per client)"
                 if sigmas and min(sigmas) != max(sigmas) else f"{dp['noise_multiplier']:.4f}")
        lines.append(f"differential privacy: clip {dp['clip']:g}, noise multiplier "
                     f"{sigma}, delta {dp['delta']}, budget "
                     f"{dp['budget'] if dp['budget'] else 'none'}; epsilon spent per client: "
                     f"{spent}")
    return "\n".join(lines)
