// Package linalg holds the engine's linear algebra: the exact SVD of a sum
// of low-rank products (thin QRs and a small core SVD, lowrank.go), the
// randomized SVD of dense updates (rsvd.go), and the rank rules that pick
// how many singular values a factorisation keeps (rank.go: svd_rank as a
// rank or the energy rule, and the truncation error).
package linalg
