"""The data source contract (`data.source`) and the loss mask every source shares."""

# A target equal to IGNORE is neither trained nor scored: the loss covers the targets
# of real tokens (segment id > 0) that are not IGNORE.
IGNORE = -1


class DataSource:
    """A `data.source`: its own settings (`data.<name>.*`) and its documents."""

    settings = None  # a dataclass of its own settings, or None
    resumable = ()  # fields of `settings` that a resumed run may change
    earlier_defaults: dict = {}  # setting -> its value before its default changed
    # Eval also reports `eval_<accuracy>_accuracy`: the share of scored targets the
    # model's argmax predicts. None: no accuracy.
    accuracy = None

    @staticmethod
    def validate_config(cfg) -> None:
        """Raise ConfigError for a bad value of its settings (cfg: the data section)."""

    @staticmethod
    def tokenizer(cfg):
        """None: the items are documents (text), encoded by `data.tokenizer`. A source of
        token-id rows returns their vocabulary (a TokenIds); its items are then rows
        {"inputs", "targets", "segment_ids", "positions"} of `data.seq_len`."""
        return None

    @staticmethod
    def components(cfg):
        """None; a mixture of sources gives its parts: (source name, weight, the data
        config that reads that source)."""
        return None

    @staticmethod
    def open(cfg, split: str):
        """(the items of `split`, a grain data source; where they came from, for
        messages)."""
        raise NotImplementedError
