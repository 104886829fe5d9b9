"""Data: the datasets on disk (VOC aug, ADE20K, Cityscapes, folders, Hugging Face), class
tables, the one image reader and the published train / test pipelines. (The embedded demo
scenes and dataset preparation are tooling: `demo_scenes`, `prepare`.)"""
