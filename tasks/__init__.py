"""Kairos release pipeline on doit: flavors -> task graph -> artifacts in outputs/."""
