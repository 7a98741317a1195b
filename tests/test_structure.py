"""The module structure of simcal: the import graph is acyclic and every module imports only lower layers.

The layer order is declared once, here. A module may import modules of its own layer only where the pair is
listed in SAME_LAYER_IMPORTS; every `simcal` module must have a layer (a new module is placed deliberately).
"""
import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / 'simcal'

# lowest first; modules in one tuple share a layer
LAYERS = [
    ('core',),
    ('checks',),        # annotation checks shared by every reader
    ('data', 'synth', 'sampler', 'model'),
    ('htc',),           # the Hybrid Task Cascade, built from model's parts
    ('evaluate', 'longtail'),
    ('comm',),          # process group, devices, collectives
    ('checkpoint',),    # detector checkpoints and run metadata
    ('detector',),      # the detector contract (and the training flip)
    ('htc_adapter',),   # the contract for HTC (three stages)
    ('inference',),     # distributed inference into result records
    ('train', 'calibration', 'oracle'),
    ('retrain',),       # cRT / LWS / BAGS on a frozen detector, on the calibration machinery
    ('testing', 'convert'),   # `simcal test` (inference + calibration + evaluation); release checkpoints -> ours
    ('repro',),
    ('cli',),           # the command registry, on top
]
SAME_LAYER_IMPORTS = {('synth', 'data')}
LAYER = {m: i for i, layer in enumerate(LAYERS) for m in layer}


def simcal_imports(path: Path) -> set:
    "The `simcal` modules a file imports, anywhere in it (module level or inside functions), and the CLI's registry."
    tree = ast.parse(path.read_text(), filename=str(path))
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            mod = node.module or ''
            if node.level == 1: parts = mod.split('.') if mod else [a.name for a in node.names]
            elif mod == 'simcal' or mod.startswith('simcal.'): parts = mod.split('.')[1:] or [a.name for a in node.names]
            else: continue
            out.update(p for p in ([parts[0]] if mod else parts) if p)
        elif isinstance(node, ast.Import):
            for a in node.names:
                if a.name.startswith('simcal.'): out.add(a.name.split('.')[1])
        elif path.stem == 'cli' and isinstance(node, ast.Constant) and isinstance(node.value, str) \
                and node.value.startswith('simcal.') and node.value.count('.') == 1:
            out.add(node.value.split('.')[1])   # imported by name (importlib) from the CLI's COMMANDS table
    return out - {'__version__', '_modidx', '__init__'}


def graph() -> dict:
    return {p.stem: simcal_imports(p) for p in sorted(PKG.glob('*.py')) if p.stem not in ('__init__', '_modidx')}


def test_every_module_has_a_layer():
    assert sorted(set(graph()) - set(LAYER)) == []


def test_lower_layers_never_import_higher_ones():
    bad = []
    for mod, deps in graph().items():
        for d in deps:
            if d not in LAYER or mod not in LAYER: continue
            if LAYER[d] > LAYER[mod] or (LAYER[d] == LAYER[mod] and d != mod and (mod, d) not in SAME_LAYER_IMPORTS):
                bad.append(f'{mod} (layer {LAYER[mod]}) imports {d} (layer {LAYER[d]})')
    assert bad == []


def find_cycle(g: dict):
    "A cycle of the directed graph `g` as a list of nodes, or None."
    state, stack = {}, []
    def visit(n):
        state[n] = 1; stack.append(n)
        for d in sorted(g.get(n, ())):
            if state.get(d) == 1: return stack[stack.index(d):] + [d]
            if d not in state:
                c = visit(d)
                if c: return c
        state[n] = 2; stack.pop()
        return None
    for n in sorted(g):
        if n not in state:
            c = visit(n)
            if c: return c
    return None


def test_import_graph_is_acyclic():
    g = {m: {d for d in deps if d != m} for m, deps in graph().items()}
    assert find_cycle(g) is None, find_cycle(g)


def test_the_checks_have_teeth(tmp_path):
    # the parser sees relative, absolute and function-level imports, and a cycle is found
    f = tmp_path / 'x.py'
    f.write_text('from .core import a\nimport simcal.data\ndef f():\n    from simcal.train import g\n    from . import comm\n')
    assert simcal_imports(f) == {'core', 'data', 'train', 'comm'}
    assert find_cycle({'a': {'b'}, 'b': {'c'}, 'c': {'a'}}) == ['a', 'b', 'c', 'a']
    assert find_cycle({'a': {'b'}, 'b': set()}) is None
    assert 'cli' in LAYER and LAYER['calibration'] < LAYER['testing'] and LAYER['comm'] < LAYER['calibration']
