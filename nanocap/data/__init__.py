"""The data worlds: where captions and CLIP features come from.

    layout.py    the on-disk dataset every source writes (captions.jsonl + features.safetensors), and
                 the labeled and unlabeled training sets, each with .batch()
    images.py    reading any image file as RGB, or failing in one line
    shapes.py    the shapes world: scenes, renderer, caption grammar and the parser that scores claims
    pretrain.py  the shapes world's toy foundation models (two CLIPs and a GPT)
    real.py      COCO's Karpathy split and your own folder of images
    webpool.py   an unlabeled web pool: webdataset tars to feature shards
    pool.py      stage 2's unlabeled pool, memory-mapped, with the same .batch()
"""
