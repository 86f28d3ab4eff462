"""`data.source=tfds`: a TensorFlow Datasets dataset prepared as ArrayRecord, read by
random access (`data_source`) without TensorFlow, one document per record.

Only prepared data is read: the dataset is looked up in `data.tfds.data_dir` (or TFDS's
default directory) from its files, never downloaded or generated here. A catalogue
dataset is prepared once, on a machine with what its builder needs, by
`tfds build NAME --data_dir DIR --file_format array_record`; a local corpus by
`efflm data build` (`efflm/data/build.py`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from efflm.data.base import DataSource
from efflm.errors import ConfigError, DataError


@dataclass
class TfdsSettings:
    name: str = ""  # the dataset, optionally with its config and version: lm1b:1.1.0
    data_dir: str = ""  # where it was prepared; empty: TFDS's default (TFDS_DATA_DIR)
    text_feature: str = "text"  # the feature holding each document's text
    train_split: str = "train"
    val_split: str = "validation"  # lm1b has none: use test


def data_dir_of(settings: TfdsSettings) -> str:
    import tensorflow_datasets

    return settings.data_dir or tensorflow_datasets.core.constants.DATA_DIR


class TextRecords:
    """The texts of one split of a prepared dataset (a grain random-access source)."""

    def __init__(self, records, feature: str):
        self.records, self.feature = records, feature

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> str:
        text = self.records[index][self.feature]
        return text.decode("utf-8", errors="replace") if isinstance(text, bytes) else str(text)


def open_split(settings: TfdsSettings, split: str) -> TextRecords:
    """The records of `split` of the prepared dataset `settings` names; DataError when
    it is not prepared there, or has no such split or text feature."""
    import tensorflow_datasets
    from tensorflow_datasets.core import read_only_builder

    where = data_dir_of(settings)
    try:
        builder = read_only_builder.builder_from_files(settings.name, data_dir=where)
    except tensorflow_datasets.core.registered.DatasetNotFoundError:
        raise DataError(
            f"data.tfds.name={settings.name!r} is not prepared in {where!r}; prepare a "
            f"catalogue dataset with `tfds build {settings.name.split(':')[0]} --data_dir "
            f"{where} --file_format array_record`, or a local corpus with `efflm data build "
            f"NAME --from PATH`, or set data.tfds.data_dir") from None
    except ValueError as e:  # a name TFDS cannot parse
        raise DataError(f"data.tfds.name={settings.name!r} is not a TFDS dataset name "
                        f"(name[/config][:version]): {str(e).splitlines()[0]}") from None
    info = builder.info
    if split not in info.splits:
        raise DataError(f"the TFDS dataset {settings.name!r} has no split {split!r}; it has: "
                        f"{', '.join(sorted(info.splits))} (data.tfds.train_split, "
                        "data.tfds.val_split)")
    features = list(info.features.keys())
    if settings.text_feature not in features:
        raise DataError(f"data.tfds.text_feature={settings.text_feature!r} is not a feature "
                        f"of {settings.name!r}; it has: {', '.join(features)}")
    try:
        records = builder.as_data_source(split=split)
    except (ValueError, NotImplementedError) as e:  # e.g. prepared as tfrecord
        raise DataError(f"the TFDS dataset {settings.name!r} in {where!r} cannot be read by "
                        f"random access ({str(e).splitlines()[0]}); prepare it with "
                        "--file_format array_record") from None
    return TextRecords(records, settings.text_feature)


class Tfds(DataSource):
    """`data.source=tfds`: a prepared TFDS dataset (`data.tfds.*`)."""

    settings = TfdsSettings
    resumable = ("data_dir",)  # the same dataset may have moved

    @staticmethod
    def validate_config(cfg) -> None:
        if not cfg.tfds.name:
            raise ConfigError("data.source=tfds needs data.tfds.name, e.g. "
                              "data.tfds.name=lm1b data.tfds.val_split=test")

    @staticmethod
    def open(cfg, split: str):
        s = cfg.tfds
        name = s.train_split if split == "train" else s.val_split
        where = os.path.join(data_dir_of(s), s.name)
        return open_split(s, name), f"the {name!r} split of {where}"
