import os

os.environ.setdefault("ARCOURSE_QUICK", "1")
os.environ.setdefault("ARCOURSE_PROGRESS", "off")
