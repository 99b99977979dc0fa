"""The frozen-prefix cache: hidden states of the frozen lower blocks, computed once and reused."""
