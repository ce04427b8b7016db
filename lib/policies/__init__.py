"""The pi0 policies: sizes, checked loading, processors, the graph pi0, the flag pi0, LoRA, the factories."""
