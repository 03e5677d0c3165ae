#!/usr/bin/env python3
"""Run kohya-ss/musubi-tuner's real training script for a family on the CPU with
``--network_module lycoris_kohya``, on micro models built from musubi's own classes, and tabulate:
exit code, modules the network made, the loss / key-norm values musubi logged, and whether the saved
file reloads (and onto which layers). Nothing is downloaded: see docs/real-trainers.md.

  python scripts/real_trainers/musubi.py --musubi /path/to/musubi-tuner --family wan --out /tmp/lk-real

``--musubi`` is a checkout (with src/musubi_tuner) or a git directory (its HEAD is extracted under --out).
``--python`` is the interpreter of a venv with musubi's requirements and lycoris_kohya installed
(default: ~/.cache/lycoris_kohya_musubi/venv/bin/python). Steps run one at a time, under ``nice -n 15``.
This file only orchestrates; what runs inside musubi's venv is inside.py, the micro models <family>_micro.py.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
INSIDE = os.path.join(HERE, "inside.py")
DEFAULT_PYTHON = os.path.expanduser("~/.cache/lycoris_kohya_musubi/venv/bin/python")
EXTRAS = ("fp8_base", "fp8_scaled", "blocks_to_swap", "resume", "dim_from_weights", "base_weights")


# ----- musubi's source ---------------------------------------------------------------------------
def musubi_source(path: str, out: str) -> tuple:
    """(src folder to put on PYTHONPATH, commit)."""
    path = os.path.abspath(path)
    if os.path.isdir(os.path.join(path, "src", "musubi_tuner")):
        r = subprocess.run(["git", "-C", path, "rev-parse", "HEAD"], capture_output=True, text=True)
        return os.path.join(path, "src"), (r.stdout.strip() if r.returncode == 0 else "unknown (not a git checkout)")
    r = subprocess.run(["git", "--git-dir", path, "rev-parse", "HEAD"], capture_output=True, text=True)
    if r.returncode != 0:
        sys.exit(f"--musubi {path}: neither a checkout with src/musubi_tuner nor a git directory")
    commit = r.stdout.strip()
    dest = os.path.join(out, f"musubi-{commit[:12]}")
    if not os.path.isdir(os.path.join(dest, "src", "musubi_tuner")):
        os.makedirs(dest, exist_ok=True)
        archive = subprocess.Popen(["git", "--git-dir", path, "archive", "HEAD"], stdout=subprocess.PIPE)
        subprocess.run(["tar", "-x", "-C", dest], stdin=archive.stdout, check=True)
        if archive.wait() != 0:
            sys.exit(f"git archive of {path} failed")
    return os.path.join(dest, "src"), commit


# ----- running things in musubi's venv -----------------------------------------------------------
class Venv:
    def __init__(self, python: str, src: str, out: str, timeout: int):
        self.python, self.timeout = python, timeout
        hf_home = os.path.join(out, "hf_home")  # empty: nothing cached on this machine is used either
        os.makedirs(hf_home, exist_ok=True)
        self.env = dict(os.environ, PYTHONPATH=src, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
                        HF_DATASETS_OFFLINE="1", HF_HOME=hf_home, PYTHONUNBUFFERED="1")

    def inside(self, args: list, log: str, cwd: str) -> tuple:
        """Run inside.py ARGS; the log gets stdout and stderr. Returns (exit code, log text, seconds)."""
        cmd = ["nice", "-n", "15", self.python, INSIDE, *args]
        t0 = time.time()
        with open(log, "w") as f:
            f.write("$ " + " ".join(cmd) + "\n")
            f.flush()
            try:
                rc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=self.env, cwd=cwd,
                                    timeout=self.timeout).returncode
            except subprocess.TimeoutExpired:
                rc = 124
        with open(log, errors="replace") as f:
            return rc, f.read(), time.time() - t0

    def result(self, text: str):
        lines = [ln for ln in text.splitlines() if ln.startswith("RESULT ")]
        return json.loads(lines[-1][len("RESULT "):]) if lines else None


# ----- what a log says ---------------------------------------------------------------------------
STEP = re.compile(r"(\d+)/(\d+) \[[^\]]*?(?:, ([^\]]*))?\]")


def step_logs(text: str) -> list:
    """musubi's progress bar postfix at each step (avr_loss, and with --scale_weight_norms
    'Keys Scaled' and 'Average key norm'): the last one shown for each step number."""
    by_step = {}
    for chunk in re.split(r"[\r\n]", text):
        if "steps:" not in chunk:
            continue
        m = STEP.search(chunk)
        if not m or not m.group(3):
            continue
        post = dict(kv.split("=", 1) for kv in m.group(3).split(", ") if "=" in kv)
        by_step.setdefault(int(m.group(1)), {}).update(post)
    return [{"step": s, **by_step[s]} for s in sorted(by_step) if s > 0]


def traceback_tail(text: str, n: int = 25) -> str:
    i = text.rfind("Traceback (most recent call last)")
    lines = (text[i:] if i >= 0 else text).rstrip().splitlines()
    return "\n".join(lines[-n:])


def failure(text: str) -> str:
    """The error line and the innermost frame in musubi or lycoris_kohya (file:line), from a traceback."""
    tail = traceback_tail(text, 400).splitlines()
    frames = [re.search(r'File "([^"]*(?:musubi_tuner|lycoris_kohya)/[^"]*)", line (\d+)', ln) for ln in tail]
    frames = [f for f in frames if f]
    where = ""
    if frames:
        path, line = frames[-1].groups()
        where = re.sub(r".*/(musubi_tuner|lycoris_kohya)/", r"\1/", path) + f":{line}"
    errors = [ln for ln in tail if re.match(r"^[A-Za-z_.]+(Error|Exception)\b", ln)]
    return f"{errors[-1] if errors else tail[-1] if tail else ''} at {where or '?'}"


def first(pattern: str, text: str):
    m = re.search(pattern, text)
    return m.groups() if m else None


# ----- the runs ----------------------------------------------------------------------------------
def plan(algos: list, extras: list) -> list:
    """(name, network_args, extra trainer args, what it needs): each algorithm without and with DoRA,
    then the extras on one algorithm each."""
    runs = []
    for algo in algos:
        runs.append((algo, [f"algo={algo}"], [], None))
        runs.append((f"{algo}-dora", [f"algo={algo}", "dora_wd=True"], [], None))
    base = algos[0]
    table = {
        "fp8_base": (f"{base}-fp8_base", [f"algo={base}"], ["--fp8_base"], None),
        "fp8_scaled": (f"{base}-dora-fp8_scaled", [f"algo={base}", "dora_wd=True"], ["--fp8_base", "--fp8_scaled"], None),
        "blocks_to_swap": (f"{algos[-1]}-dora-swap1", [f"algo={algos[-1]}", "dora_wd=True"], ["--blocks_to_swap", "1"], None),
        "resume": (f"{base}-resume", [f"algo={base}"], ["--network_weights", "{file}"], base),
        # musubi's --dim_from_weights is a flag; the file is --network_weights (training/parser_common.py)
        "dim_from_weights": (f"{base}-dim_from_weights", [], ["--dim_from_weights", "--network_weights", "{file}"], base),
        "base_weights": (f"{base}-over-base_weights", [f"algo={base}"], ["--base_weights", "{file}"], base),
    }
    runs += [table[e] for e in extras]
    return runs


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--musubi", required=True, help="musubi-tuner checkout or git directory")
    p.add_argument("--family", default="wan", choices=["wan", "zimage"])
    p.add_argument("--algos", default="locon,loha,lokr")
    p.add_argument("--extras", default=",".join(EXTRAS), help=f"comma list of {', '.join(EXTRAS)}, or none")
    p.add_argument("--only", default=None, help="comma list of run names (as in the table) to run")
    p.add_argument("--out", required=True)
    p.add_argument("--python", default=DEFAULT_PYTHON if os.path.exists(DEFAULT_PYTHON) else sys.executable)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--dim", type=int, default=4)
    p.add_argument("--alpha", type=float, default=2)
    p.add_argument("--timeout", type=int, default=900, help="seconds for each script")
    a = p.parse_args()

    out = os.path.abspath(a.out)
    logs, work = os.path.join(out, "logs"), os.path.join(out, "work")
    os.makedirs(logs, exist_ok=True)
    src, commit = musubi_source(a.musubi, out)
    venv = Venv(a.python, src, out, a.timeout)
    sys.path.insert(0, HERE)
    fam = __import__(f"{a.family}_micro")
    print(f"musubi-tuner {commit} ({src}); python {a.python}", flush=True)

    rc, text, secs = venv.inside(["build", "--family", a.family, "--work", work], os.path.join(logs, "build.log"), out)
    paths = venv.result(text)
    if rc != 0 or paths is None:
        sys.exit(f"building the micro models failed (exit {rc}):\n{traceback_tail(text)}")
    print(f"built in {secs:.0f}s: {json.dumps(paths)}", flush=True)

    # musubi's own caching scripts (the VAE and the text encoder), run from work/ where the tokenizer lies
    for module, argv in fam.cache_commands(paths):
        name = module.rsplit(".", 1)[-1]
        rc, text, secs = venv.inside(["run", "--family", a.family, "-m", module, "--", *argv, "--skip_existing"],
                                     os.path.join(logs, name + ".log"), work)
        print(f"{name}: exit {rc} in {secs:.0f}s", flush=True)
        if rc != 0:
            sys.exit(f"{name} failed:\n{traceback_tail(text)}")

    extras = [] if a.extras in ("", "none") else a.extras.split(",")
    unknown = set(extras) - set(EXTRAS)
    if unknown:
        sys.exit(f"unknown --extras {sorted(unknown)}; known: {', '.join(EXTRAS)}")
    only = set(a.only.split(",")) if a.only else None
    results, saved = [], {}
    for name, net_args, extra, needs in plan(a.algos.split(","), extras):
        if only is not None and name not in only:
            continue
        row = {"run": name, "network_args": " ".join(net_args), "extra": " ".join(extra)}
        if needs is not None:
            if needs not in saved:
                row.update(rc=None, note=f"skipped: needs the file of run {needs}")
                results.append(row)
                continue
            extra = [x.replace("{file}", saved[needs]) for x in extra]
            row["extra"] = " ".join(x if x != saved[needs] else f"<{needs}>.safetensors" for x in extra)
        run_out = os.path.join(out, "runs", name)
        argv = fam.train_args(paths) + [
            "--network_module", "lycoris_kohya", "--network_dim", str(a.dim), "--network_alpha", f"{a.alpha:g}",
            "--optimizer_type", "AdamW", "--learning_rate", "1e-3", "--max_train_steps", str(a.steps),
            "--max_data_loader_n_workers", "0", "--seed", "42", "--scale_weight_norms", "1.0",
            "--output_dir", run_out, "--output_name", name, *extra]
        if net_args:
            argv += ["--network_args", *net_args]
        rc, text, secs = venv.inside(["run", "--family", a.family, "-m", fam.train_module(), "--", *argv],
                                     os.path.join(logs, name + ".log"), work)
        applied = first(r"lycoris_kohya: applied to (\d+) text encoder and (\d+)", text)
        steps = step_logs(text)
        row.update(rc=rc, seconds=round(secs), modules=int(applied[1]) if applied else None, steps=steps,
                   summary=(first(r"lycoris_kohya: (\w+ network, .*)", text) or [None])[0],
                   weights_loaded=(first(r"load network weights from [^:]*: (.*)", text) or [None])[0],
                   warnings=sorted(set(re.findall(r"WARNING:lycoris_kohya[^\n]*", text))))
        file = os.path.join(run_out, name + ".safetensors")
        if rc != 0:
            row["traceback"], row["failure"] = traceback_tail(text), failure(text)
        if rc == 0 and os.path.exists(file):
            saved[name] = file
            rrc, rtext, _ = venv.inside(["reload", "--family", a.family, "--dit", paths["dit"], "--file", file],
                                        os.path.join(logs, name + ".reload.log"), work)
            row["reload"] = venv.result(rtext) or {"reload_ok": False, "reload_error": traceback_tail(rtext, 8)}
        results.append(row)
        print(f"{name}: exit {rc} in {secs:.0f}s, modules {row['modules']}, "
              f"last step {steps[-1] if steps else None}, reload {row.get('reload')}", flush=True)

    report = {"date": datetime.date.today().isoformat(), "musubi_commit": commit, "family": a.family,
              "python": a.python, "lycoris_kohya": lycoris_version(venv), "runs": results}
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump(report, f, indent=1)
    table = markdown(report)
    with open(os.path.join(out, "table.md"), "w") as f:
        f.write(table)
    print(table)
    sys.exit(0 if all(r.get("rc") == 0 and r.get("reload", {}).get("reload_ok") for r in results) else 1)


def lycoris_version(venv: Venv) -> str:
    r = subprocess.run([venv.python, "-c", "import lycoris_kohya, os; print(os.path.dirname(lycoris_kohya.__file__))"],
                       capture_output=True, text=True, env=venv.env)
    where = r.stdout.strip()
    g = subprocess.run(["git", "-C", where, "describe", "--always", "--dirty"], capture_output=True, text=True)
    return f"{where} ({g.stdout.strip() or 'not in git'})"


def markdown(report: dict) -> str:
    head = (f"musubi-tuner {report['musubi_commit'][:12]}, family {report['family']}, {report['date']}; "
            f"lycoris_kohya {report['lycoris_kohya']}\n\n"
            "| run | network args | trainer args | exit | modules | steps | avr_loss first → last | avg key norm first → last (keys scaled) | "
            "reload: modules (names = file) | musubi's own LoRA: modules (same layers) |\n"
            "|---|---|---|---|---|---|---|---|---|---|\n")
    failures = []
    rows = []
    for r in report["runs"]:
        last = r.get("steps", [{}])[-1] if r.get("steps") else {}
        one = r["steps"][0] if r.get("steps") else {}
        rl = r.get("reload", {})
        reload = (f"ok {rl.get('reloaded_modules')} ({rl.get('reloaded_names_equal_file')})" if rl.get("reload_ok")
                  else ("FAILED: " + rl.get("reload_error", "")[:80] if rl else "–"))
        own = f"{rl['musubi_lora_modules']} ({rl['musubi_lora_names_equal_file']})" if "musubi_lora_modules" in rl else "–"
        norms = (f"{one.get('Average key norm', '–')} → {last.get('Average key norm', '–')} ({last.get('Keys Scaled', '–')})"
                 if last else "–")
        loss = f"{one.get('avr_loss', '–')} → {last.get('avr_loss', '–')}" if last else "–"
        rows.append(f"| {r['run']} | `{r['network_args'] or '(from file)'}` | `{r['extra'] or '-'}` | "
                    f"{r.get('rc') if r.get('rc') is not None else r.get('note')} | {r.get('modules', '–')} | "
                    f"{last.get('step', 0)} | {loss} | {norms} | {reload} | {own} |")
        if r.get("failure"):
            failures.append(f"- {r['run']}: `{r['failure']}`")
    return head + "\n".join(rows) + "\n" + ("\nFailures:\n\n" + "\n".join(failures) + "\n" if failures else "")


if __name__ == "__main__":
    main()
