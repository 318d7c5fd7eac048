"""BibTeX of the methods fico implements, by key (components and recipes name these keys).

Every entry lists all authors by full name, the venue and year, and the arXiv id (and the
DOI where the publisher gives one), so it can be pasted into a paper as it is.
"""

BIBTEX = {
    "bolya2023tome": """@inproceedings{bolya2023tome,
  title         = {Token Merging: Your {ViT} But Faster},
  author        = {Bolya, Daniel and Fu, Cheng-Yang and Dai, Xiaoliang and Zhang, Peizhao and Feichtenhofer, Christoph and Hoffman, Judy},
  booktitle     = {International Conference on Learning Representations (ICLR)},
  year          = {2023},
  eprint        = {2210.09461},
  archivePrefix = {arXiv}
}""",
    "liang2022evit": """@inproceedings{liang2022evit,
  title         = {Not All Patches are What You Need: Expediting Vision Transformers via Token Reorganizations},
  author        = {Liang, Youwei and Ge, Chongjian and Tong, Zhan and Song, Yibing and Wang, Jue and Xie, Pengtao},
  booktitle     = {International Conference on Learning Representations (ICLR)},
  year          = {2022},
  eprint        = {2202.07800},
  archivePrefix = {arXiv}
}""",
    "chen2024fastv": """@inproceedings{chen2024fastv,
  title         = {An Image is Worth 1/2 Tokens After Layer 2: Plug-and-Play Inference Acceleration for Large Vision-Language Models},
  author        = {Chen, Liang and Zhao, Haozhe and Liu, Tianyu and Bai, Shuai and Lin, Junyang and Zhou, Chang and Chang, Baobao},
  booktitle     = {European Conference on Computer Vision (ECCV)},
  year          = {2024},
  eprint        = {2403.06764},
  archivePrefix = {arXiv}
}""",
    "han2026ficoco": """@inproceedings{han2026ficoco,
  title         = {Filter, Correlate, Compress: Training-Free Token Reduction for {MLLM} Acceleration},
  author        = {Han, Yuhang and Liu, Xuyang and Zhang, Zihan and Ding, Pengxiang and Chen, Junjie and Chen, Honggang and Wang, Donglin and Yan, Qingsen and Huang, Siteng},
  booktitle     = {Proceedings of the AAAI Conference on Artificial Intelligence},
  volume        = {40},
  number        = {6},
  year          = {2026},
  doi           = {10.1609/aaai.v40i6.42460},
  eprint        = {2411.17686},
  archivePrefix = {arXiv}
}""",
}
