# DESeq2 in a fresh R process. Args: data_dir out_dir genes_file(1-based indices)
# Timed (system.time): gene-wise dispersions (estimateDispersionsGeneEst, no Cox-Reid,
# minmu 1e-6), then the Wald-test GLM fit (nbinomWaldTest, betaPrior = FALSE) *at those
# gene-wise dispersions*, with the given size factors and the given design matrix.
args <- commandArgs(trailingOnly = TRUE)
status_mb <- function(key) {  # VmHWM (peak so far) or VmRSS (now) of this process, MiB
  line <- grep(paste0("^", key, ":"), readLines("/proc/self/status"), value = TRUE)
  as.numeric(strsplit(trimws(sub(paste0(key, ":"), "", line)), " +")[[1]][1]) / 1024
}
# peak memory of the fit window (as bench/workers/_common.py FitMemory): record the peak so
# far (reading the data), reset the kernel's high-water mark, read it again after the fit
reset_hwm <- function() {
  tryCatch({ cat("5", file = "/proc/self/clear_refs"); TRUE }, error = function(e) FALSE)
}
data_dir <- args[1]; out_dir <- args[2]; genes <- scan(args[3], quiet = TRUE)
suppressPackageStartupMessages(library(DESeq2))
sf <- scan(file.path(data_dir, "sf.txt"), quiet = TRUE)
X <- as.matrix(read.csv(file.path(data_dir, "design.csv"), check.names = FALSE))
coef_names <- colnames(X)
colnames(X) <- paste0("c", seq_len(ncol(X)))  # syntactic names for DESeq2's mcols
n_cells <- length(sf)
con <- file(file.path(data_dir, "counts.f64"), "rb")
n_genes <- file.info(file.path(data_dir, "counts.f64"))$size / 8 / n_cells
# one copy of the counts: read the vector, set its dim in place, subset only when asked
Y <- readBin(con, "double", n = n_cells * n_genes, size = 8, endian = "little")
close(con)
dim(Y) <- c(n_genes, n_cells)
if (length(genes) < n_genes) Y <- Y[genes, , drop = FALSE]
storage.mode(Y) <- "integer"
rownames(Y) <- paste0("g", genes)
colnames(Y) <- paste0("cell", seq_len(n_cells))
dds <- suppressMessages(DESeqDataSetFromMatrix(Y, colData = data.frame(row.names = colnames(Y), one = rep(1, n_cells)),
                                               design = ~1))
sizeFactors(dds) <- sf
invisible(gc())
mem_load_peak <- status_mb("VmHWM")
hwm_reset <- reset_hwm()
mem_before_fit <- status_mb("VmRSS")
t <- system.time({
  dds <- estimateDispersionsGeneEst(dds, useCR = FALSE, minmu = 1e-6, modelMatrix = X,
                                    quiet = TRUE)
  dispersions(dds) <- mcols(dds)$dispGeneEst
  dds <- nbinomWaldTest(dds, modelMatrix = X, betaPrior = FALSE, minmu = 1e-6, quiet = TRUE)
})
mem_fit_peak <- status_mb("VmHWM")
mc <- mcols(dds)
beta <- as.matrix(as.data.frame(mc[, colnames(X)])) * log(2)  # log2 -> natural log
disp <- mc$dispGeneEst
disp[is.na(disp)] <- NaN
beta[is.na(beta)] <- NaN
iter <- mc$betaIter; iter[is.na(iter)] <- NaN
conv <- mc$betaConv; conv[is.na(conv)] <- FALSE
writeBin(as.vector(t(beta)), file.path(out_dir, "beta.f64"), size = 8, endian = "little")
writeBin(as.vector(disp), file.path(out_dir, "overdispersion.f64"), size = 8, endian = "little")
writeBin(as.double(iter), file.path(out_dir, "iter.f64"), size = 8, endian = "little")
writeBin(as.double(conv), file.path(out_dir, "conv.f64"), size = 8, endian = "little")
writeLines(c(sprintf("%.6f", t[["elapsed"]]), sprintf("%.6f", t[["user.self"]]),
             as.character(packageVersion("DESeq2")), R.version.string,
             paste(coef_names, collapse = "\t"), sprintf("%.3f", mem_before_fit), sprintf("%.3f", mem_fit_peak),
             sprintf("%.3f", mem_load_peak), as.character(hwm_reset),
             basename(sessionInfo()$BLAS)),
           file.path(out_dir, "timing.txt"))
