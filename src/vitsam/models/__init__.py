"""Model zoo (built on timm) and the hooks the analyses need."""
