# DESeq2 in a fresh R process. Args: data_dir out_dir genes_file(1-based indices)
# Timed (system.time): gene-wise dispersions (estimateDispersionsGeneEst, no Cox-Reid,
# minmu 1e-6), then the Wald-test GLM fit (nbinomWaldTest, betaPrior = FALSE) *at those
# gene-wise dispersions*, with the given size factors and the given design matrix.
args <- commandArgs(trailingOnly = TRUE)
hwm_mb <- function() {  # this process's peak resident memory so far (VmHWM), MiB
  line <- grep("^VmHWM:", readLines("/proc/self/status"), value = TRUE)
  as.numeric(strsplit(trimws(sub("VmHWM:", "", line)), " +")[[1]][1]) / 1024
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
Y <- matrix(readBin(con, "double", n = n_cells * n_genes, size = 8, endian = "little"),
            nrow = n_genes, ncol = n_cells)
close(con)
Y <- Y[genes, , drop = FALSE]
storage.mode(Y) <- "integer"
rownames(Y) <- paste0("g", genes)
colnames(Y) <- paste0("cell", seq_len(n_cells))
dds <- suppressMessages(DESeqDataSetFromMatrix(Y, colData = data.frame(row.names = colnames(Y), one = rep(1, n_cells)),
                                               design = ~1))
sizeFactors(dds) <- sf
invisible(gc())
mem_before_fit <- hwm_mb()
t <- system.time({
  dds <- estimateDispersionsGeneEst(dds, useCR = FALSE, minmu = 1e-6, modelMatrix = X,
                                    quiet = TRUE)
  dispersions(dds) <- mcols(dds)$dispGeneEst
  dds <- nbinomWaldTest(dds, modelMatrix = X, betaPrior = FALSE, minmu = 1e-6, quiet = TRUE)
})
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
             paste(coef_names, collapse = "\t"), sprintf("%.3f", mem_before_fit), sprintf("%.3f", hwm_mb())),
           file.path(out_dir, "timing.txt"))
