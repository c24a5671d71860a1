"""Data layer: sources -> validated PreferenceRows -> stage splits -> tokenised datasets -> batches.

    rows.py       PreferenceRow, DataError, ReadReport (and row validation)
    formats.py    field conventions of each layout / Hub set
    readers.py    read_source / read_rows: files, directories, Hub sets, local Hub copies
    splits.py     split_indices, load_stage_rows (DeepSpeed-Chat's data_split)
    templates.py  format_prompt, response_text (the one prompt rendering)
    datasets.py   SFTDataset, PairDataset, PromptDataset, collators
    cache.py      cached_tokenize (npz, no pickle)
    synthetic.py  offline demo data;  validate.py  the data checker CLI

Import from the module that defines a name (no re-exports here: `python -m utils.data.validate` stays torch-free).
"""
