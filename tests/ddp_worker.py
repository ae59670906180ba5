"""Run a short training job and save this process's weights (used by tests/test_train.py).

Usage: python tests/ddp_worker.py OUT_DIR key=value ...   (also under torchrun)
"""

import os
import sys
from pathlib import Path

from safetensors.torch import save_file

from ayt.config import load_config
from ayt.train import Trainer

if __name__ == "__main__":
    out = Path(sys.argv[1])
    trainer = Trainer(load_config(None, sys.argv[2:]))
    trainer.run()
    rank = int(os.environ.get("RANK", "0"))
    weights = {k: v.contiguous() for k, v in trainer.net.state_dict().items()}
    weights.update({f"{name}.{k}": v.contiguous() for name, module in trainer.extras.items() for k, v in module.state_dict().items()})
    save_file(weights, str(out / f"rank{rank}.safetensors"))
