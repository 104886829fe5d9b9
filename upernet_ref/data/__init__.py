"""Data: the datasets on disk (VOC aug, ADE20K, Cityscapes, folders, Hugging Face), the embedded
demo scenes, class tables, the published train / test pipelines and dataset preparation."""
