"""BibTeX of the methods fico implements, by key (components and recipes name these keys)."""

BIBTEX = {
    "bolya2023tome": """@inproceedings{bolya2023tome,
  title     = {Token Merging: Your {ViT} But Faster},
  author    = {Bolya, Daniel and Fu, Cheng-Yang and Dai, Xiaoliang and Zhang, Peizhao and Feichtenhofer, Christoph and Hoffman, Judy},
  booktitle = {International Conference on Learning Representations},
  year      = {2023}
}""",
    "liang2022evit": """@inproceedings{liang2022evit,
  title     = {Not All Patches are What You Need: Expediting Vision Transformers via Token Reorganizations},
  author    = {Liang, Youwei and Ge, Chongjian and Tong, Zhan and Song, Yibing and Wang, Jue and Xie, Pengtao},
  booktitle = {International Conference on Learning Representations},
  year      = {2022}
}""",
    "chen2024fastv": """@inproceedings{chen2024fastv,
  title     = {An Image is Worth 1/2 Tokens After Layer 2: Plug-and-Play Inference Acceleration for Large Vision-Language Models},
  author    = {Chen, Liang and Zhao, Haozhe and Liu, Tianyu and Bai, Shuai and Lin, Junyang and Zhou, Chang and Chang, Baobao},
  booktitle = {European Conference on Computer Vision},
  year      = {2024}
}""",
    "han2026ficoco": """@inproceedings{han2026ficoco,
  title     = {Filter, Correlate, Compress: Training-Free Token Reduction for {MLLM} Acceleration},
  author    = {Han, Yuhang and Liu, Xuyang and others},
  booktitle = {Proceedings of the AAAI Conference on Artificial Intelligence},
  year      = {2026},
  note      = {arXiv:2411.17686}
}""",
}
