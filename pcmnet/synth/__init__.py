"""Synthetic image-caption corpora (SynthImgCap-style, METHODS.md section 2).

    config.py    SynthConfig (YAML: configs/synth_coco_sd15.yaml)
    shard.py     which process owns which caption (accelerate), pair seeds
    generate.py  pipeline loading and the generation loop (`pcmnet synth`)
    manifest.py  on-disk layout, atomic writes, manifest parts, merge, read_manifest_records
    score.py     CLIP score s = max(cos(g(x), t(c)), 0) (`pcmnet synth score`)
    export.py    Hugging Face dataset / parquet export (`pcmnet synth export`)
    tiny.py      a tiny random SD pipeline: the offline path (`pcmnet synth tiny`)

Python API:

    from pcmnet.synth.config import SynthConfig
    from pcmnet.synth.generate import generate
    generate(SynthConfig(captions=CorpusConfig(path="caps.txt"), model="stable-diffusion-v1-5/...", out="synth"))
"""
