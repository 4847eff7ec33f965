"""The data sets' names as they were when all of them lived here; the parts:

- `trainer.formats`: the format table (layouts, classes, each format's default augmentation)
- `trainer.splits`: split discovery (`load_split`, `read_classes`, `Sample`)
- `trainer.checks`: file checks before training (`check_samples`)
- `trainer.transforms`: joint image/label transforms; `trainer.augment`: the augmentation modes
- `trainer.datasets`: `TrainSet`, `EvalSet`

New code imports from the parts; this module keeps the older imports working.
"""
from trainer.augment import REFERENCE_SHORT_SIDE  # noqa: F401
from trainer.checks import check_samples  # noqa: F401
from trainer.datasets import EvalSet, TrainSet  # noqa: F401
from trainer.splits import SPLITS, Sample, check_data_folder, load_split, read_classes  # noqa: F401
