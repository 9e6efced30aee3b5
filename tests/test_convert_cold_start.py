"""No graph break on a cold start: in a fresh process, with the default backend ("auto"), torch._dynamo.explain of
a converted network finds one graph, train and eval. Before anything is traced, importing fastresnet has created
every backend (fastresnet/backends/__init__.py), so no backend module is imported inside the traced forward."""
import json
import os
import subprocess
import sys
from pathlib import Path

SCRIPT = """
import json, torch
from fastresnet import convert
from test_convert import TimmStyleResNetV2
model, report = convert(TimmStyleResNetV2())       # backend None: the default in force, "auto"
assert report.num_preact > 0
out = {}
for training in (True, False):
    e = torch._dynamo.explain(model.train(training))(torch.randn(2, 3, 8, 8))
    out[str(training)] = [e.graph_count, e.graph_break_count, [str(r.reason)[:300] for r in e.break_reasons]]
print(json.dumps(out))
"""


def test_no_graph_break_in_fresh_process():
    env = {k: v for k, v in os.environ.items() if k != "FASTRESNET_BACKEND"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(Path(__file__).parent), env.get("PYTHONPATH")]))
    proc = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    for training, (graphs, breaks, reasons) in result.items():
        assert (graphs, breaks) == (1, 0), (training, reasons)
