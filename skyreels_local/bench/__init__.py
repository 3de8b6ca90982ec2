"""`skyreels-local bench`: stock diffusers against each speed preset, and its report."""
