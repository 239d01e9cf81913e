"""Applications on top of the pipeline stages and units: keyword spotting (`kws`), text generation (`textgen`)
and the Aaren/KV-cache comparison (`kvcompare`). The core never imports them."""
