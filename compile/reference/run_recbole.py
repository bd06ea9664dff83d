"""The public reference for `compile sasrec`: RecBole 1.2.1's SASRec on ML-100k under the same protocol
(leave-one-out by time, full ranking, seen items masked, early stopping on valid NDCG@10), with small
compat shims for torch 2.13 / numpy 2. RecBole is not a dependency of this project: run it in its own venv.

    python -m venv /tmp/recbole-venv && /tmp/recbole-venv/bin/pip install torch==2.13.0 recbole==1.2.1 pandas scipy
    make data   # data/ml-100k/ (RecBole atomic files)
    /tmp/recbole-venv/bin/python compile/reference/run_recbole.py compile/reference/recbole_sasrec_ml100k.yaml THREADS BUDGET_S

Prints BEST_VALID and TEST (hit/ndcg/mrr @10/@20). Cost here: RecBole expands every prefix of every
training sequence into its own sample, and its first epoch took 467 s on one of this machine's 2 cores
(ours trains on whole sequences in ~14 s an epoch), so a run to convergence takes hours on this CPU.
"""
import sys, time
import numpy as np
import torch

# torch >= 2.6 defaults torch.load(weights_only=True); RecBole pickles its config in checkpoints.
_load = torch.load
def _load_compat(*a, **kw):
    kw.setdefault("weights_only", False)
    return _load(*a, **kw)
torch.load = _load_compat
# numpy 2 removed the deprecated aliases that RecBole still uses in places.
for name, tp in (("float", float), ("int", int), ("bool", bool), ("long", int)):
    if not hasattr(np, name):
        setattr(np, name, tp)
if not hasattr(np, "float_"):
    np.float_ = np.float64
for name, tp in (("complex_", np.complex128), ("object_", np.object_ if hasattr(np, "object_") else object)):
    if name not in np.__dict__:
        setattr(np, name, tp)
if not hasattr(np, "unicode_"):
    np.unicode_ = np.str_

# ray is only used by RecBole's hyper-parameter search; a stub module satisfies its import.
import types
_ray = types.ModuleType("ray"); _ray.tune = types.ModuleType("ray.tune")
sys.modules.setdefault("ray", _ray); sys.modules.setdefault("ray.tune", _ray.tune)

torch.set_num_threads(int(sys.argv[2]) if len(sys.argv) > 2 else 2)
from logging import getLogger

from recbole.config import Config
from recbole.data import create_dataset, data_preparation
from recbole.utils import get_model, get_trainer, init_logger, init_seed

budget_s = float(sys.argv[3]) if len(sys.argv) > 3 else 1500.0  # wall-clock budget for training


class OutOfTime(Exception):
    pass


t0 = time.time()
config = Config(model="SASRec", dataset="ml-100k", config_file_list=[sys.argv[1]])
init_seed(config["seed"], config["reproducibility"])
init_logger(config)
logger = getLogger()
logger.info(config)
dataset = create_dataset(config)
logger.info(dataset)
train_data, valid_data, test_data = data_preparation(config, dataset)
init_seed(config["seed"] + config["local_rank"], config["reproducibility"])
model = get_model(config["model"])(config, train_data._dataset).to(config["device"])
trainer = get_trainer(config["MODEL_TYPE"], config["model"])(config, model)


def stop_when_out_of_time(epoch, valid_score):
    if time.time() - t0 > budget_s:
        raise OutOfTime(f"training budget of {budget_s:.0f}s spent after epoch {epoch}")


stopped = "early stopping"
try:
    trainer.fit(train_data, valid_data, saved=True, show_progress=False, callback_fn=stop_when_out_of_time)
except OutOfTime as e:
    stopped = str(e)
test_result = trainer.evaluate(test_data, load_best_model=True, show_progress=False)
print("STOPPED", stopped)
print("BEST_VALID", trainer.best_valid_score, "epoch", getattr(trainer, "cur_step", None))
print("TEST", dict(test_result), "seconds", round(time.time() - t0, 1))
