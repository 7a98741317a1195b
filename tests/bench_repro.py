"""Benchmark of the main job: runs `simcal repro` (all paper notebooks, default parameters) into a fresh work folder
and prints the time of every step and notebook, and the total, as a table; then the same grouped by kind of work.

    python tests/bench_repro.py                 # fresh temporary folders (nothing reused), removed afterwards
    python tests/bench_repro.py --keep DIR      # keep the work folder and figures in DIR
    python tests/bench_repro.py --from runs     # only print the table of an earlier run (its repro_timing.json)

The machine's load average is printed with the numbers: on shared cores, wall-clock times grow with the load."""
import argparse, json, os, shutil, subprocess, sys, tempfile, time
from pathlib import Path

from simcal.repro import timing_table

ROOT = Path(__file__).resolve().parents[1]


def by_kind(timing: dict) -> list:
    "Seconds per kind of work: base training, calibration, test passes, and the rest (in the notebook kernels)."
    kinds = {'train': 'base training', 'calibrate': 'calibration', 'test': 'test passes'}
    rows = {v: [0, 0.0] for v in kinds.values()}
    for s in timing['steps']:
        k = kinds.get(s['step'].split()[0])
        if k and not s.get('reused'): rows[k][0] += 1; rows[k][1] += s['seconds']
    steps = sum(r[1] for r in rows.values())
    rows['data, evaluation, tables, figures, kernel start-up'] = [None, timing['total_seconds'] - steps]
    return [(k, n, sec, sec / timing['total_seconds']) for k, (n, sec) in rows.items()]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument('--keep', default=None, help='run into this folder and keep it')
    ap.add_argument('--from', dest='src', default=None, help="print the table of an earlier run's work folder")
    a = ap.parse_args(argv)
    if a.src:
        work = Path(a.src)
    else:
        base = Path(a.keep) if a.keep else Path(tempfile.mkdtemp(prefix='simcal-bench-repro-'))
        work = base / 'runs'
        t0, load0 = time.time(), os.getloadavg()[0]
        rc = subprocess.call([sys.executable, '-m', 'simcal.cli', 'repro', '--work-dir', str(work),
                              '--out', str(base / 'figures')], cwd=ROOT)
        print(f'\nwall {time.time() - t0:.0f} s; load average {load0:.1f} at the start, {os.getloadavg()[0]:.1f} at the end')
        if rc != 0: sys.exit(rc)
    timing = json.loads((work / 'repro_timing.json').read_text())
    print('\n' + timing_table(timing['steps'], timing['notebooks'], timing['total_seconds']))
    print('\n| work | runs | seconds | share |\n|---|---|---|---|')
    for k, n, sec, share in by_kind(timing): print(f"| {k} | {'' if n is None else n} | {sec:.0f} | {100 * share:.0f}% |")
    if not a.src and not a.keep: shutil.rmtree(base, ignore_errors=True)


if __name__ == '__main__':
    main()
