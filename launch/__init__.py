"""Launchers: Cloud TPU job submission (tpu.py) and the Colab demo notebook (colab_demo.ipynb)."""
